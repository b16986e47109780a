"""raylane registry list|promote|rollback: the MLflow model registry's versions and aliases."""

from __future__ import annotations

from raylane.commands._common import add_json
from raylane.output import json_stdout
from runtime.defaults import default_storage_root
from runtime.registry import Registry


def register(sub) -> None:
    p = sub.add_parser("registry", help="model registry: list versions, promote a champion, roll back")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    common = {"help": "storage root holding the embedded registry (default $RAYLANE_STORAGE_ROOT or ~/.raylane; "
                      "MLFLOW_TRACKING_URI overrides)"}
    ls = verbs.add_parser("list", help="versions with their aliases and metrics")
    ls.add_argument("name", nargs="?", help="registered model name (default: every model)")
    pr = verbs.add_parser("promote", help="make VERSION the champion (the old champion becomes 'previous')")
    pr.add_argument("name")
    pr.add_argument("version", type=int)
    rb = verbs.add_parser("rollback", help="give 'champion' back to the 'previous' version")
    rb.add_argument("name")
    for v in (ls, pr, rb):
        v.add_argument("--storage-root", default=default_storage_root(), **common)
        add_json(v)
        v.set_defaults(func=_run)


def _run(args) -> int:
    with json_stdout(args.json) as emit:
        reg = Registry(args.storage_root)
        if args.verb == "list":
            versions = reg.list(args.name)
            if args.json:
                emit({"uri": reg.uri, "versions": [v.to_dict() for v in versions]})
                return 0
            if not versions:
                print(f"no models in {reg.uri}")
            for v in versions:
                loss = v.metrics.get("eval_loss")
                print(f"{v.name} v{v.version:<3} {','.join(v.aliases) or '-':<22} "
                      f"eval_loss={'-' if loss is None else f'{loss:.4f}'}  {v.source}")
            return 0
        v = reg.promote(args.name, args.version) if args.verb == "promote" else reg.rollback(args.name)
        if args.json:
            emit(v)
        else:
            print(f"{v.name}: champion is now v{v.version} ({v.source})")
    return 0
