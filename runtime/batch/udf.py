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

import os
import subprocess

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
