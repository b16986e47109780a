"""ray.data.llm's vLLM engine stage, asking vLLM for each row's final output only.

The stock stage consumes vLLM's default output stream: a ``RequestOutput`` for every request
after every engine step (cumulative text, detokenized so far), of which it keeps only the last.
For a batch of 256 sequences x 64 tokens that is ~16k Python objects built, queued and dropped in
the actor process, which on a small machine shares the cores with the engine. Setting
``output_kind=FINAL_ONLY`` makes vLLM build one output per row, at the end; the stage sees the
same final output. (The flag cannot travel in the row's ``sampling_params``: it is an enum, which
Arrow cannot hold, and unpickling it would import vLLM in every preprocess task.)

Imported by the engine actor (and by ``runtime.batch.engine`` when it builds the processor).
"""

from __future__ import annotations

from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF


class FinalOutputEngineUDF(vLLMEngineStageUDF):
    def __init__(self, *args, **kwargs):
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
