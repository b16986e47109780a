"""raylane status NAME: the state of a RayJob / RayService / RayCronJob / RayCluster."""

from __future__ import annotations

from cluster.client import KUBERAY_KINDS
from raylane.commands._common import add_json
from raylane.commands.apply import add_kube_flags, connect
from raylane.output import json_stdout


def register(sub) -> None:
    p = sub.add_parser(
        "status", help="show a KubeRay object's state (a RayJob succeeds only on SUCCEEDED)"
    )
    p.add_argument("name", help="object name (the spec's name)")
    p.add_argument("--kind", choices=KUBERAY_KINDS, default=None, help="look only for this kind")
    add_kube_flags(p)
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    with json_stdout(args.json) as emit:
        st = connect(args).status(args.name, kind=args.kind)
        if args.json:
            emit(st)
        else:
            print(
                f"{st.kind}/{st.name} ({st.namespace}): {st.state}"
                + (f" - {st.message}" if st.message else "")
            )
            for k, v in st.details.items():
                if v not in (None, {}, []):
                    print(f"  {k}: {v}")
    return 1 if st.ok is False else 0
