"""raylane classify: which workload shape, scheduler, queue and runtime fit the work."""

from __future__ import annotations

from raylane.commands._common import add_json, yes_no
from raylane.output import json_stdout
from runtime.classify import classify


def register(sub) -> None:
    p = sub.add_parser("classify", help="answer five questions, get the workload shape and how to run it")
    p.add_argument("--new-artifact", metavar="yes|no", help="does it produce a new model artifact?")
    p.add_argument("--same-architecture", metavar="yes|no", help="same architecture as a base model?")
    p.add_argument("--latency-budget-ms", type=float, default=None, help="per-request latency budget (omit: none)")
    p.add_argument("--fan-out", metavar="yes|no", help="fans out into tools, retrieval or multi-step reasoning?")
    p.add_argument("--gpu-heavy", metavar="yes|no", help="GPU-heavy?")
    p.add_argument("--hours", type=float, default=None, help="expected run time in hours")
    add_json(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    d = classify(
        new_artifact=yes_no(args.new_artifact, "--new-artifact"),
        same_architecture=yes_no(args.same_architecture, "--same-architecture"),
        latency_budget_ms=args.latency_budget_ms,
        fan_out=yes_no(args.fan_out, "--fan-out"),
        gpu_heavy=yes_no(args.gpu_heavy, "--gpu-heavy"),
        hours=args.hours,
    )
    with json_stdout(args.json) as emit:
        if args.json:
            emit(d)
        else:
            print(f"shape:     {d.shape}\nscheduler: {d.scheduler}\nqueue:     {d.queue}\n"
                  f"runtime:   {d.runtime}\ncluster:   {d.cluster}\nreason:    {d.reason}")
    return 0
