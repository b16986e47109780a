"""The engine side of a batch run: prompts to token ids, outliers to error rows, and the
``ray.data.llm`` vLLM processor that generates.

Prompts are tokenized once, in the CPU prepare stage (``runtime.batch.plane.Prepare``), with
the model's own tokenizer: the length check that
routes over-long prompts to error rows then sees exactly the tokens vLLM would, and the engine
receives token ids, so the processor needs no tokenize stage. Its chat-template and detokenize
stages are off too (vLLM detokenizes as it generates): on a small machine those extra Ray Data
actors take cores from the engine, which is where a plain processor loses half its throughput.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.specs.batch import BatchInferenceSpec
from runtime.vllm_env import engine_runtime_env

ID, SHARD = "__rl_id", "__rl_shard"
# vLLM accepts only these LoRA ranks for max_lora_rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def prompt_limit(spec: BatchInferenceSpec) -> tuple[int, str]:
    """The most prompt tokens a row may have, and which setting imposes it."""
    context = spec.max_model_len - 1  # at least one token of room to generate
    if spec.max_prompt_tokens is not None and spec.max_prompt_tokens < context:
        return spec.max_prompt_tokens, "max_prompt_tokens"
    return context, "the model context (max_model_len)"


def prepare_prompts(spec: BatchInferenceSpec, values: list[Any], tokenizer) -> list[list[int] | str]:
    """Token ids per row, or an error reason (str) for an empty, malformed or over-long prompt."""
    limit, why = prompt_limit(spec)
    chat = spec.input.messages_column is not None
    texts: list[str | None] = []
    out: list[list[int] | str] = []
    for v in values:
        reason, text = _text(v, chat, tokenizer)
        out.append(reason or "")
        texts.append(text)
    todo = [i for i, t in enumerate(texts) if t is not None]
    if todo:
        # The chat template already holds the special tokens it wants.
        enc = tokenizer([texts[i] for i in todo], add_special_tokens=not chat)["input_ids"]
        for i, ids in zip(todo, enc):
            if len(ids) > limit:
                out[i] = f"prompt too long: {len(ids)} tokens, over {why} limit of {limit}"
            else:
                out[i] = list(ids)
    return out


def _text(value: Any, chat: bool, tokenizer) -> tuple[str | None, str | None]:
    if chat:
        if not value:
            return "empty prompt: no messages", None
        try:
            msgs = [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in value]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a malformed row must not stop the corpus
            return f"bad messages: {type(e).__name__}: {e}", None
        return None, text
    if value is None:
        return "empty prompt: null", None
    if not isinstance(value, str):
        return f"bad prompt: expected text, got {type(value).__name__}", None
    if not value.strip():
        return "empty prompt", None
    return None, value


def sampling_params(spec: BatchInferenceSpec) -> dict[str, Any]:
    s = spec.sampling
    params = dict(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, ignore_eos=s.ignore_eos)
    if s.seed is not None:
        params["seed"] = s.seed
    return params


def lora_rank(adapter_dir: str) -> int:
    r = int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 8))
    return next(k for k in LORA_RANKS if k >= r)


def engine_kwargs(spec: BatchInferenceSpec, adapter_dir: str | None) -> dict[str, Any]:
    # Ray Data's vLLM stage logs engine stats after every batch unless told not to.
    kwargs: dict[str, Any] = {"max_model_len": spec.max_model_len, "disable_log_stats": True}
    if not spec.resources.uses_gpu:
        kwargs["enforce_eager"] = True  # no CUDA graphs on CPU
        # ray.data.llm builds an AsyncLLM, which vLLM sizes like an online server (on CPU: 128
        # sequences, 2048 tokens per step); offline `LLM` gets 256 and 4096. Batch work wants the
        # offline sizes: fewer, fuller engine steps.
        kwargs.update(max_num_seqs=256, max_num_batched_tokens=4096)
    if adapter_dir:
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank(adapter_dir))
    kwargs.update(spec.engine_kwargs)
    return kwargs


def build_processor(spec: BatchInferenceSpec, model_dir: str, adapter_dir: str | None):
    """A ``ray.data.llm`` vLLM processor with the engine stage only: rows come in already in the
    processor's data column (``engine_input``) and leave it as they are (``engine_row``).

    No preprocess or postprocess map: the driver has tokenized the prompts and knows the sampling
    parameters, so those stages would only re-wrap each row, and on a small machine their task
    workers (dozens of short-lived processes at fractional CPUs) take cores from the engine."""
    from ray.data.llm import build_processor as build
    from ray.data.llm import vLLMEngineProcessorConfig

    from runtime.batch.udf import use_final_outputs

    res = spec.resources
    bundle: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.uses_gpu:
        bundle["GPU"] = res.gpus_per_worker
    config = vLLMEngineProcessorConfig(
        model_source=model_dir,
        engine_kwargs=engine_kwargs(spec, adapter_dir),
        batch_size=spec.batch_size,
        max_concurrent_batches=spec.max_concurrent_batches,
        concurrency=(res.num_workers, res.num_workers),
        accelerator_type=res.accelerator_type,
        placement_group_config={"bundle_per_worker": bundle},
        runtime_env=_engine_env(spec),
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,  # one row's engine error becomes an error row
        log_engine_metrics=False,
    )
    processor = build(config)
    use_final_outputs(processor)  # one vLLM output per row, not one per row per step
    if spec.engine_node_labels:
        # The engine actors' own Ray options (one device per engine: no placement group).
        for stage in processor.stages.values():
            stage.map_batches_kwargs["label_selector"] = dict(spec.engine_node_labels)
    # The processor wraps even absent pre/postprocess functions in identity map stages; rows
    # arrive already wrapped (engine_input) and leave wrapped (engine_output), so drop both.
    processor.preprocess = processor.postprocess = None
    return processor


def _engine_env(spec: BatchInferenceSpec) -> dict[str, Any]:
    from runtime.batch.udf import DEADLINE_ENV

    env = engine_runtime_env(spec.resources.uses_gpu)
    env["env_vars"] = {**env.get("env_vars", {}), DEADLINE_ENV: str(spec.engine_deadline_s())}
    return env


def engine_input(spec: BatchInferenceSpec, adapter_dir: str | None, rows: list[dict]) -> list[dict]:
    """Rows ``{__rl_id, __rl_shard, tokenized_prompt}`` as the engine stage reads them: inside the
    processor's data column, with the sampling parameters (and the adapter) each row needs."""
    from ray.llm._internal.batch.processor.base import Processor

    params = sampling_params(spec)
    lora = {"model": adapter_dir} if adapter_dir else {}
    return [{Processor.DATA_COLUMN: {**row, "sampling_params": dict(params), **lora}} for row in rows]


def engine_output(batch) -> list[dict]:
    """The engine stage's output rows (a pyarrow batch) as flat dicts for ``engine_row``."""
    from ray.llm._internal.batch.processor.base import Processor

    return batch.column(Processor.DATA_COLUMN).to_pylist()


def engine_row(row: dict) -> dict:
    """An engine stage output row as a shard row."""
    err = row.get("__inference_error__") or None
    return {
        "id": str(row[ID]),
        "output": None if err else (row.get("generated_text") or ""),
        "error": f"engine error: {err}" if err else None,
        "num_input_tokens": int(row.get("num_input_tokens") or 0),
        "num_output_tokens": 0 if err else int(row.get("num_generated_tokens") or 0),
    }
