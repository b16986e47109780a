"""raylane rollout start|status|abort: canary releases of a served model or adapter."""

from __future__ import annotations

from raylane.commands._common import add_json
from raylane.output import json_stdout
from runtime.defaults import default_storage_root


def register(sub) -> None:
    p = sub.add_parser("rollout", help="canary release: start one, show its state, abort it")
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    st = verbs.add_parser("start", help="start releasing a candidate on a serving app (its spec's rollout: section)")
    st.add_argument("spec", help="the OnlineInference spec YAML of the serving app")
    st.add_argument("--candidate", default=None,
                    help="registry version or alias to release (models:/NAME/VERSION or models:/NAME@ALIAS); "
                         "default: the spec's rollout.candidate, else models:/NAME@challenger")
    st.add_argument("--address", default=None,
                    help="Ray cluster serving the app (HOST:PORT; default $RAY_ADDRESS): start the rollout's "
                         "controller there now. Without one, the app's replicas start it (rollout.controller: "
                         "cluster)")
    ss = verbs.add_parser("status", help="state, step, weight, per-arm metrics and the reason of the last decision")
    ab = verbs.add_parser("abort", help="end a rollout now: the candidate gets no more traffic; aliases untouched")
    ab.add_argument("--reason", default="aborted by hand", help="recorded in the rollout's history")
    for v in (ss, ab):
        v.add_argument("name", help="the rollout's name (the serving app's spec name)")
        v.add_argument("--storage-root", default=default_storage_root(),
                       help="storage root holding the rollout (default $RAYLANE_STORAGE_ROOT or ~/.raylane)")
    for v in (st, ss, ab):
        add_json(v)
        v.set_defaults(func=_run)


def _run(args) -> int:
    from runtime import release

    with json_stdout(args.json) as emit:
        if args.verb == "start":
            import os

            state = release.rollout_start(args.spec, candidate=args.candidate)
            address = args.address or os.environ.get("RAY_ADDRESS")
            if address:
                from runtime.specs import load_spec

                release.rollout_control(state.name, address, load_spec(args.spec).storage.resolved())
            elif not args.json:
                if state.config.get("controller", "cluster") == "cluster":
                    print("note: the state is saved; the app's replicas start its controller on their "
                          "cluster within seconds", flush=True)
                else:
                    print("note: rollout.controller is manual: nothing moves the weights until "
                          "runtime.release.rollout_evaluate is called", flush=True)
        elif args.verb == "status":
            state = release.rollout_status(args.name, args.storage_root)
        else:
            state = release.rollout_abort(args.name, args.storage_root, reason=args.reason)
        if args.json:
            emit(state.summary())
        else:
            _print(state.summary())
    return 0


def _print(s: dict) -> None:
    print(f"rollout {s['name']}: {s['state']}  step {s['step']}/{len(s['steps'])}  "
          f"candidate weight {s['weight']:g}%")
    print(f"  {s['model_id']}: champion {s['champion']}, candidate {s['candidate']}")
    for arm, m in s["arms"].items():
        def ms(v):
            return "-" if v is None else f"{v * 1000:.0f}ms"
        quality = "-" if m.get("quality") is None else f"{m['quality']:.4g}"
        print(f"  {arm:<9} requests={m['requests']} errors={m['errors']} ({m['error_rate']:.2%}) "
              f"ttft_p95={ms(m.get('ttft_p95_s'))} e2e_p95={ms(m.get('e2e_p95_s'))} quality={quality}")
    print(f"  reason: {s['reason']}")
