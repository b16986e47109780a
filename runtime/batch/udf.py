"""ray.data.llm's vLLM engine stage, asking vLLM for each row's final output only.

The stock stage consumes vLLM's default output stream: a ``RequestOutput`` for every request
after every engine step (cumulative text, detokenized so far), of which it keeps only the last.
For a batch of 256 sequences x 64 tokens that is ~16k Python objects built, queued and dropped in
the actor process, which on a small machine shares the cores with the engine. Setting
``output_kind=FINAL_ONLY`` makes vLLM build one output per row, at the end; the stage sees the
same final output. (The flag cannot travel in the row's ``sampling_params``: it is an enum, which
Arrow cannot hold, and unpickling it would import vLLM in every preprocess task.)

It also keeps the engine's shared-memory cleanup quiet at shutdown (``_orphan_resource_tracker``).

Imported by the engine actor (and by ``runtime.batch.engine`` when it builds the processor).
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time

from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF


class FinalOutputEngineUDF(vLLMEngineStageUDF):
    def __init__(self, *args, **kwargs):
        _orphan_resource_tracker()  # before the engine starts its processes: they inherit it
        super().__init__(*args, **kwargs)
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        prepare = self.llm._prepare_llm_request

        async def final_only(row):
            request = await prepare(row)
            if isinstance(request.params, SamplingParams):
                request.params.output_kind = RequestOutputKind.FINAL_ONLY
            return request

        self.llm._prepare_llm_request = final_only
        _Watchdog(self, float(os.environ.get(DEADLINE_ENV) or 0)).start()


DEADLINE_ENV = "RAYLANE_ENGINE_DEADLINE_S"


class _Watchdog:
    """Exits the engine actor when its vLLM engine died or stalled, so Ray Data starts a new actor
    and re-runs the rows in flight (they reach the writer again; the first copy wins).

    Dead: a vLLM process this actor started is gone (Ray Data's own handling covers a dead
    engine only once a request fails with ``EngineDeadError``; an idle actor would keep it).
    Stalled: rows are in flight and none has finished for ``deadline_s`` (a hung or stopped
    engine process never fails a request: without this the job would wait forever)."""

    def __init__(self, udf, deadline_s: float):
        import psutil

        self.udf, self.deadline = udf, deadline_s
        self.inflight, self.last = 0, time.monotonic()
        # vLLM names its engine process VLLM::EngineCore (its process title).
        self.children = [p for p in psutil.Process().children(recursive=True)
                         if "EngineCore" in _name(p)]
        generate = udf._generate_with_error_handling

        async def tracked(row, batch_uuid):
            if self.inflight == 0:
                self.last = time.monotonic()  # the clock starts with the first row in flight
            self.inflight += 1
            try:
                return await generate(row, batch_uuid)
            finally:
                self.inflight -= 1
                self.last = time.monotonic()

        udf._generate_with_error_handling = tracked

    def start(self) -> None:
        threading.Thread(target=self._run, name="raylane-engine-watchdog", daemon=True).start()

    def _run(self) -> None:
        every = min(2.0, self.deadline / 4) if self.deadline else 2.0
        while True:
            time.sleep(every)
            gone = [p.pid for p in self.children if not _alive(p)]
            if gone:
                self._exit(f"vLLM engine process {gone[0]} died")
            idle = time.monotonic() - self.last
            if self.deadline and self.inflight and idle > self.deadline:
                self._exit(f"vLLM engine finished none of {self.inflight} rows in flight for {idle:.0f}s "
                           f"(shard_deadline_s {self.deadline:.0f})")

    def _exit(self, why: str) -> None:
        import psutil

        logging.getLogger("raylane.batch").error(f"[raylane] {why}: exiting the engine actor so Ray replaces it")
        for p in psutil.Process().children(recursive=True):
            try:
                p.kill()  # a stopped (SIGSTOP) process dies of SIGKILL too
            except psutil.Error:
                pass
        os._exit(1)  # a system error: Ray Data retries the actor's tasks on a new actor


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(p) -> str:
    import psutil

    try:
        return p.name() + " " + " ".join(p.cmdline())
    except psutil.Error:
        return ""


def use_final_outputs(processor) -> None:
    """Swap the processor's vLLM engine stage UDF for ``FinalOutputEngineUDF``."""
    swapped = 0
    for stage in processor.stages.values():
        if stage.fn is vLLMEngineStageUDF:
            object.__setattr__(stage, "fn", FinalOutputEngineUDF)  # no re-validation: it would redo resources
            swapped += 1
    if swapped != 1:
        raise RuntimeError(f"expected one vLLM engine stage in the processor, found {swapped}")


def _orphan_resource_tracker() -> None:
    """Start this process's multiprocessing resource tracker outside its children.

    When a Ray actor exits, Ray SIGKILLs the actor's direct children before the actor's
    shutdown hook (``__ray_shutdown__``, where ray.data.llm shuts vLLM down) runs. Among those
    children are vLLM's engine core and the resource tracker that every engine process shares.
    The engine core's worker, a grandchild, survives, sees its parent gone and unlinks its
    shared memory; finding the tracker dead it starts a new one, which prints a ``KeyError``
    traceback for each name it never saw registered. A tracker started through a shell that
    exits at once is nobody's child here: it outlives the kill, takes the worker's unregisters,
    unlinks what the killed engine core left behind, and exits when the last process holding
    its pipe has (the tracker's own rule).
    """
    from multiprocessing import resource_tracker, spawn

    tracker = resource_tracker._resource_tracker
    if tracker._fd is not None:  # one is running already (this process made shared objects)
        return
    r, w = os.pipe()
    try:
        cmd = f"from multiprocessing.resource_tracker import main; main({r})"
        # -W: its cleanup of what a killed engine core left is the point, not worth a warning
        subprocess.run(["/bin/sh", "-c", '"$0" -W ignore::UserWarning -c "$1" &', spawn.get_executable(), cmd],
                       pass_fds=(r,), check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        os.close(w)  # the engine starts the usual tracker, and the noise comes back: no harm
        return
    finally:
        os.close(r)
    tracker._fd = w
