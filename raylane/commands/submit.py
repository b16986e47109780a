"""raylane submit SPEC --address http://HEAD:8265: run a spec on any Ray cluster via the Jobs API."""

from __future__ import annotations

from raylane.commands._common import add_json
from raylane.commands.apply import add_kube_flags, connect
from raylane.output import info, json_stdout
from runtime.submit import submit


def register(sub) -> None:
    p = sub.add_parser(
        "submit", help="submit a spec as a Ray job (the project as working_dir), follow its logs"
    )
    p.add_argument("spec", help="path to the spec YAML")
    p.add_argument(
        "--address",
        default=None,
        help="the cluster's dashboard, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS/$RAY_ADDRESS)",
    )
    p.add_argument(
        "--no-follow",
        action="store_true",
        help="return once submitted instead of following the logs",
    )
    p.add_argument(
        "--project",
        default=None,
        help="folder uploaded as working_dir (default: . if it has jobs/)",
    )
    p.add_argument(
        "--max-file-mb", type=float, default=10.0, help="leave files larger than this behind (10)"
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="stop the job after this many seconds"
    )
    p.add_argument(
        "--cluster",
        metavar="NAME",
        default=None,
        help="a KubeRay RayCluster (or RayJob/RayService) to submit to: its auth token is read from "
        "the Secret KubeRay keeps it in, and --address defaults to its in-cluster head service "
        "(outside the cluster: `kubectl port-forward svc/NAME-head-svc 8265` and --address "
        "http://127.0.0.1:8265)",
    )
    add_kube_flags(p)
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    with json_stdout(args.json) as emit:
        address, token = args.address, None
        if args.cluster:
            auth = connect(args).dashboard_auth(args.cluster)
            address, token = address or auth.address, auth.token
            if token is None:
                info(
                    f"warning: RayCluster/{auth.cluster} runs WITHOUT token auth (kubernetes.auth: none): "
                    "anyone who reaches its dashboard can run code there"
                )
        r = submit(
            args.spec,
            address,
            follow=not args.no_follow,
            project_dir=args.project,
            max_file_mb=args.max_file_mb,
            timeout_s=args.timeout,
            token=token,
        )
        if args.json:
            emit(r)
        else:
            print(f"job {r.job_id}: {r.status}" + (f" ({r.message})" if r.message else ""))
    if args.no_follow:
        return 0
    return 0 if r.ok else 1
