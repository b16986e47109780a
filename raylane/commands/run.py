"""raylane run SPEC: run a spec on a local Ray cluster (or --address).

The terminal gets the run's progress line and its result; Ray's, Serve's, HAProxy's and vLLM's
logs go to a file under the spec's storage root (``--verbose`` streams them instead).
"""

from __future__ import annotations

import json
import time

from raylane.commands._common import add_address, add_json, add_verbose
from raylane.output import engine_logs, json_stdout, log_file, to_jsonable


def register(sub) -> None:
    p = sub.add_parser("run", help="run a spec: train, fine-tune, batch, serve or agent")
    p.add_argument("spec", help="path to the spec YAML")
    add_address(p)
    add_json(p)
    add_verbose(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from raylane.display import StageLines, console_for, result_figure
    from runtime.progress import listen
    from runtime.run import run, runner_for
    from runtime.specs import load_spec

    spec = load_spec(args.spec)
    runner_for(spec.kind)  # fail before starting Ray if this shape cannot run here
    log = None if args.verbose else log_file(_log_root(spec), spec.name)
    with json_stdout(args.json) as emit, engine_logs(log) as term:
        con = console_for(term.err)
        if log:
            con.print(f"Ray, Serve, HAProxy and vLLM logs: {log}  (--verbose shows them here)", markup=False)
        # --verbose: notes reach stderr as they are made (runtime.progress), so no second copy
        lines = StageLines(con, live=log is not None, keep_notes=log is not None)
        label = f"{spec.kind} {spec.name}"
        t0 = time.perf_counter()
        try:
            lines.start(1, 1, label, str(args.spec))
            with listen(lines.note):
                try:
                    result = run(spec, address=args.address)
                except BaseException as e:
                    lines.failed(1, 1, label, round(time.perf_counter() - t0, 1), e)
                    raise
            ok = getattr(result, "ok", True)
            lines.finish(label, time.perf_counter() - t0, result_figure(to_jsonable(result)), ok=ok)
        finally:
            lines.close()
        if args.json:
            emit(result)
        else:
            term.out.write(json.dumps(to_jsonable(result), indent=2, default=str) + "\n")
            term.out.flush()
    return 0 if ok else 1


def _log_root(spec) -> str:
    """The spec's storage root when it is local, else raylane's default local one."""
    from runtime.specs.common import DEFAULT_STORAGE_ROOT

    root = spec.storage.root
    return DEFAULT_STORAGE_ROOT if "://" in root else root
