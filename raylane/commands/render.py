"""raylane render SPEC [-o DIR] [--serve-config] [--cluster] [--monitoring]: the KubeRay manifests for a spec."""

from __future__ import annotations

from cluster.monitoring import render_monitoring
from cluster.render import render, serve_config_for, write_manifests
from cluster.storage import storage_problems
from raylane.commands._common import add_json
from raylane.output import info, json_stdout
from runtime.specs import load_spec


def register(sub) -> None:
    p = sub.add_parser(
        "render", help="write the KubeRay manifests (RayJob, RayCronJob, RayService) for a spec"
    )
    p.add_argument("spec", help="path to the spec YAML")
    p.add_argument(
        "-o",
        "--output",
        metavar="DIR",
        help="write one YAML file per object into DIR (default: stdout)",
    )
    p.add_argument(
        "--serve-config",
        action="store_true",
        help="only the Ray Serve config (what `serve deploy` takes) of an OnlineInference/Agent spec",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="a standalone RayCluster of the spec's shape (then `raylane submit` jobs to it)",
    )
    p.add_argument(
        "--monitoring",
        action="store_true",
        help="only the Prometheus PodMonitor for the spec's Ray pods and the Grafana dashboard ConfigMap",
    )
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    import yaml

    spec = load_spec(args.spec)
    if args.monitoring:
        return _monitoring(spec, args)
    if not spec.kubernetes.ephemeral_storage:
        for problem in storage_problems(spec):  # `raylane apply` refuses these; rendering is for review
            info(f"warning: {problem}")
    with json_stdout(args.json) as emit:
        if args.serve_config:
            text = yaml.safe_dump(serve_config_for(spec), sort_keys=False)
            if args.output:
                from pathlib import Path

                path = Path(args.output) / f"{spec.name}.serve.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                emit({"files": [str(path)]}) if args.json else print(
                    f"wrote {path}\nnext: serve deploy {path}"
                )
            else:
                emit(yaml.safe_load(text)) if args.json else print(text, end="")
            return 0
        if args.output:
            paths = write_manifests(spec, args.output, as_cluster=args.cluster)
            if args.json:
                emit({"files": [str(p) for p in paths]})
            else:
                for p in paths:
                    print(f"wrote {p}")
                print(f"next: kubectl apply -f {args.output}  (or: raylane apply {args.spec})")
            return 0
        docs = render(spec, as_cluster=args.cluster)
        if args.json:
            emit({"manifests": docs})
        else:
            print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


def _monitoring(spec, args) -> int:
    import yaml

    docs = render_monitoring(spec)
    with json_stdout(args.json) as emit:
        if args.output:
            from pathlib import Path

            path = Path(args.output) / f"{spec.name}.monitoring.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
            emit({"files": [str(path)]}) if args.json else print(f"wrote {path}\nnext: kubectl apply -f {path}")
        elif args.json:
            emit({"manifests": docs})
        else:
            print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0
