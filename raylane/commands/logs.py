"""raylane logs NAME: driver logs of a RayJob (its submitter pod) or the head pod of a RayService."""

from __future__ import annotations

from raylane.commands.apply import add_kube_flags, connect


def register(sub) -> None:
    p = sub.add_parser(
        "logs", help="print the logs of a RayJob's driver or a RayService's head pod"
    )
    p.add_argument("name", help="object name (the spec's name)")
    p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    add_kube_flags(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    text = connect(args).logs(args.name, tail_lines=args.tail)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0
