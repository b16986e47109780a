"""raylane apply SPEC: create or patch the spec's KubeRay objects, optionally wait for the result."""

from __future__ import annotations

from cluster.client import KubeRay
from cluster.storage import check_storage
from raylane.commands._common import add_json
from raylane.output import info, json_stdout
from runtime.specs import load_spec


def add_kube_flags(p) -> None:
    p.add_argument(
        "-n",
        "--namespace",
        default=None,
        help="namespace (default: the spec's, else the context's)",
    )
    p.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)",
    )


def connect(args):
    kr = KubeRay.connect(context=args.context, kubeconfig=args.kubeconfig)
    if getattr(args, "namespace", None):
        kr.namespace = args.namespace
    return kr


def register(sub) -> None:
    p = sub.add_parser(
        "apply", help="create or update the spec's RayJob/RayCronJob/RayService on Kubernetes"
    )
    p.add_argument("spec", help="path to the spec YAML")
    p.add_argument(
        "--wait", action="store_true", help="wait until the RayJob ends / the RayService is ready"
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
    add_kube_flags(p)
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    spec = load_spec(args.spec)
    if args.namespace:
        spec = spec.model_copy(
            update={"kubernetes": spec.kubernetes.model_copy(update={"namespace": args.namespace})}
        )
    check_storage(spec)  # before connecting: a run whose files would die with its pods
    with json_stdout(args.json) as emit:
        r = connect(args).apply(spec, wait=args.wait, timeout_s=args.timeout, progress=info)
        if args.json:
            emit(r)
        else:
            print(
                f"{r.kind}/{r.name} in {r.namespace}: created {len(r.created)}, patched {len(r.patched)}, "
                f"unchanged {len(r.unchanged)}"
                + (f", recreated {', '.join(r.recreated)} (it had failed)" if r.recreated else "")
            )
            if r.status:
                print(
                    f"status: {r.status.state}"
                    + (f" ({r.status.message})" if r.status.message else "")
                )
            else:
                print(f"next: raylane status {r.name} -n {r.namespace}")
    return 0 if r.ok else 1
