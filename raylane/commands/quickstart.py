"""raylane quickstart: the whole product on one machine, stage by stage.

The terminal gets a line per stage, a summary table and where to look next; Ray's, Serve's,
HAProxy's and vLLM's logs go to a file under the work dir (``--verbose`` streams them instead).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cluster.render import quickstart_stage as render_stage
from raylane.commands._common import add_address, add_json, add_verbose
from raylane.display import StageLines, console_for
from raylane.output import engine_logs, json_stdout, log_file, to_jsonable
from runtime.log import listen

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ["train", "finetune", "batch", "serve", "agent"]


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="run every stage end to end on a local Ray cluster")
    p.add_argument("--workdir", default=".raylane/quickstart", help="where models and outputs go")
    add_address(p)
    add_json(p)
    add_verbose(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from rich.markup import escape

    from runtime.quickstart import STAGES, key_figure, quickstart

    # The KubeRay stage lives in cluster/ (runtime/ never imports it), so the CLI adds it.
    extra = [("kuberay", "render every example spec to KubeRay manifests (CRD-checked)", render_stage)]
    workdir = Path(args.workdir).expanduser().resolve()
    log = None if args.verbose else log_file(workdir, "quickstart")
    with json_stdout(args.json) as emit, engine_logs(log) as term:
        con = console_for(term.err)
        con.print(f"[bold]raylane quickstart[/]: {len(STAGES) + len(extra)} stages, work dir {escape(str(workdir))}")
        if log:
            con.print(f"Ray, Serve, HAProxy and vLLM logs: {escape(str(log))}  (--verbose shows them here)")

        def on_ray(info) -> None:
            where = "a local Ray cluster" if info.local else f"the Ray cluster at {info.address}"
            dash = f"; dashboard {info.dashboard_url}" if info.dashboard_url else ""
            con.print(f"on {where} ({info.num_cpus:g} CPUs, {info.num_gpus:g} GPUs){dash}", markup=False)

        lines = StageLines(con, live=log is not None, keep_notes=False)
        try:
            with listen(lines.note):
                r = quickstart(workdir, address=args.address, extra_stages=extra, reporter=lines, on_ray=on_ray)
        finally:
            lines.close()
        result = {**to_jsonable(r), "log_file": str(log) if log else None}
        summary = workdir / "quickstart.json"
        summary.write_text(json.dumps(result, indent=2, default=str) + "\n")
        if args.json:
            emit(result)
            return 0
        out = console_for(term.out)
        out.print(_summary(r, key_figure))
        out.print("[bold]Where to look next[/]")
        for label, value in where_next(r, log):
            out.print(f"  {label:<18} ", end="")
            out.print(value, markup=False)
    return 0


def _summary(r, key_figure):
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, title=f"quickstart finished in {r.seconds:g} s", title_justify="left")
    t.add_column("stage")
    t.add_column("time", justify="right")
    t.add_column("result", overflow="fold")
    for s in r.stages:
        t.add_row(s["stage"], f"{s['seconds']:.1f} s", key_figure(s["stage"], s))
    return t


def where_next(r, log: Path | None) -> list[tuple[str, str]]:
    """(label, path or command) pairs: what the quickstart made and how to look at it."""
    stages = {s["stage"]: s for s in r.stages}
    rows: list[tuple[str, str]] = [("every result", str(Path(r.workdir) / "quickstart.json"))]
    if log:
        rows.append(("engine logs", str(log)))
    if r.dashboard_url:
        rows.append(("Ray dashboard", f"{r.dashboard_url} (while a cluster runs: `ray start --head`, "
                                      "then --address auto)"))
    if r.ray_logs:
        rows.append(("Ray session logs", r.ray_logs))
    if r.tracking_uri:
        rows.append(("MLflow UI", f"mlflow ui --backend-store-uri {r.tracking_uri}"))
    if "batch" in stages:
        rows.append(("batch output", str(stages["batch"]["output"])))
        rows.append(("batch manifest", str(stages["batch"]["manifest"])))
        rows.append(("verify it", f"raylane batch verify {stages['batch']['output']}"))
    if "release" in stages:
        rows.append(("the rollout", stages["release"]["status"]))
    if "kuberay" in stages:
        rows.append(("KubeRay manifests", str(stages["kuberay"]["dir"])))
    examples = ROOT / "examples"
    try:  # the short form when run from the checkout, as the README has it
        examples = examples.relative_to(Path(os.getcwd()))
    except ValueError:
        pass
    for i, shape in enumerate(SHAPES):
        rows.append(("each shape alone" if i == 0 else "", f"raylane run {examples / shape}.yaml"))
    rows.append(("", "(serve and agent need an API key: export RAYLANE_API_KEYS=KEY)"))
    return rows
