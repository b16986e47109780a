"""raylane quickstart: the whole product on one machine, stage by stage."""

from __future__ import annotations

from raylane.commands._common import add_address, add_json
from raylane.output import json_stdout


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="run every stage end to end on a local Ray cluster")
    p.add_argument("--workdir", default=".raylane/quickstart", help="where models and outputs go")
    add_address(p)
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from cluster.render import quickstart_stage as render_stage
    from runtime.quickstart import quickstart

    # The KubeRay stage lives in cluster/ (runtime/ never imports it), so the CLI adds it.
    extra = [("kuberay", "render every example spec to KubeRay manifests (CRD-checked)", render_stage)]
    with json_stdout(args.json) as emit:
        r = quickstart(args.workdir, address=args.address, extra_stages=extra)
        if args.json:
            emit(r)
        else:
            print(f"quickstart finished in {r.seconds:g} s; everything it wrote is under {r.workdir}")
            for s in r.stages:
                print(f"  {s['stage']:<12} {s['seconds']:>7.2f} s")
    return 0
