"""raylane run SPEC: run a spec on a local Ray cluster (or --address).

The terminal gets the run's progress line and its result; Ray's, Serve's, HAProxy's and vLLM's
logs go to a file under the spec's storage root (``--verbose`` streams them instead).
"""

from __future__ import annotations

import json
import time

from raylane.commands._common import add_address, add_json, add_verbose
from raylane.display import StageLines, console_for, result_figure
from raylane.output import engine_logs, json_stdout, log_file, to_jsonable
from runtime.defaults import DEFAULT_STORAGE_ROOT
from runtime.errors import UsageError
from runtime.log import listen
from runtime.run import run
from runtime.specs import BatchInferenceSpec, load_spec


def register(sub) -> None:
    p = sub.add_parser("run", help="run a spec: train, fine-tune, batch, serve or agent")
    p.add_argument("spec", help="path to the spec YAML")
    add_address(p)
    add_json(p)
    add_verbose(p)
    p.add_argument("--wait", action="store_true",
                   help="BatchInference: if another run is writing the output folder, wait for it instead of exiting")
    p.set_defaults(func=_run)


def _run(args) -> int:
    spec = load_spec(args.spec)
    options = {}
    if args.wait:
        if not isinstance(spec, BatchInferenceSpec):
            raise UsageError(f"--wait applies to BatchInference specs, not {spec.kind}", hint="drop --wait")
        options["wait"] = True  # queue behind the run that holds the output folder's lease
    log = None if args.verbose else log_file(_log_root(spec), spec.name)
    with json_stdout(args.json) as emit, engine_logs(log) as term:
        con = console_for(term.err)
        if log:
            con.print(f"Ray, Serve, HAProxy and vLLM logs: {log}  (--verbose shows them here)", markup=False)
        # --verbose: notes reach stderr as they are made (runtime.log), so no second copy
        lines = StageLines(con, live=log is not None, keep_notes=log is not None)
        label = f"{spec.kind} {spec.name}"
        t0 = time.perf_counter()
        try:
            lines.start(1, 1, label, str(args.spec))
            with listen(lines.note):
                try:
                    result = run(spec, address=args.address, **options)
                except BaseException as e:
                    lines.failed(1, 1, label, round(time.perf_counter() - t0, 1), e)
                    raise
            ok = getattr(result, "ok", True)
            lines.finish(label, time.perf_counter() - t0, result_figure(to_jsonable(result)), ok=ok)
        finally:
            lines.close()
        if args.json:
            emit(result)
        else:
            term.out.write(json.dumps(to_jsonable(result), indent=2, default=str) + "\n")
            term.out.flush()
    return 0 if ok else 1


def _log_root(spec) -> str:
    """The spec's storage root when it is local, else raylane's default local one."""
    root = spec.storage.root
    return DEFAULT_STORAGE_ROOT if "://" in root else root
