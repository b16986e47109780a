"""raylane delete NAME: delete a KubeRay object and its spec ConfigMap (the weight cache stays)."""

from __future__ import annotations

from cluster.client import KUBERAY_KINDS
from raylane.commands._common import add_json
from raylane.commands.apply import add_kube_flags, connect
from raylane.output import json_stdout


def register(sub) -> None:
    p = sub.add_parser(
        "delete", help="delete a RayJob/RayService/RayCronJob/RayCluster created by raylane"
    )
    p.add_argument("name", help="object name (the spec's name)")
    p.add_argument("--kind", choices=KUBERAY_KINDS, default=None, help="delete only this kind")
    add_kube_flags(p)
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    with json_stdout(args.json) as emit:
        r = connect(args).delete(args.name, kind=args.kind)
        if args.json:
            emit(r)
        else:
            print(f"deleted {', '.join(r['deleted']) or 'nothing'} in {r['namespace']}")
    return 0
