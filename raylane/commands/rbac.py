"""raylane rbac [-n NS] [--service-account SA]: the Role (+ RoleBinding) raylane's KubeRay commands need."""

from __future__ import annotations

from cluster.rbac import rbac_manifests


def register(sub) -> None:
    p = sub.add_parser(
        "rbac",
        help="print the Kubernetes Role and RoleBinding that apply/status/logs/delete/submit --cluster need",
    )
    p.add_argument("-n", "--namespace", default="default", help="namespace of the Role (default 'default')")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--service-account", default=None, help="bind this ServiceAccount (default 'raylane')")
    who.add_argument("--user", default=None, help="bind this user instead")
    who.add_argument("--group", default=None, help="bind this group instead")
    p.add_argument(
        "--no-secrets",
        action="store_true",
        help="leave out `get secrets` (then `raylane submit --cluster` cannot read the Ray token)",
    )
    p.set_defaults(func=_run)


def _run(args) -> int:
    import yaml

    docs = rbac_manifests(
        args.namespace,
        service_account=args.service_account,
        user=args.user,
        group=args.group,
        secrets=not args.no_secrets,
    )
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0
