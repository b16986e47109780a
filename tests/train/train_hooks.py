"""Import-path hooks the training tests hand to Ray Train workers (``train.step_fn``, ``eval.metric``)."""


def paced_causal_lm(model, batch, step):
    """The default causal-LM loss, at most ~5 steps/s: the kill tests need a window between the first
    committed checkpoint and the last step that does not depend on how fast the machine is."""
    import time

    time.sleep(0.2)
    return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss


def nan_from_step_6(model, batch, step):
    """Causal-LM loss that turns NaN at the 6th step (0-based step 5): a real divergence, on cue."""
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    return loss * float("nan") if step >= 5 else loss


def mean_token_count(model_dir, texts):
    """An extra eval metric by import path: how many held-out documents it saw."""
    return {"eval_docs": float(len(texts))}


def generate_with_and_without_lora(base: str, adapter: str, prompts: list[str]):
    """Greedy outputs of the base model, then with the LoRA adapter (one vLLM engine, enable_lora)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=base, enable_lora=True, max_lora_rank=8, max_model_len=256, enforce_eager=True, seed=0)
    sp = SamplingParams(max_tokens=24, temperature=0.0)
    plain = [o.outputs[0].text for o in llm.generate(prompts, sp)]
    tuned = [o.outputs[0].text for o in llm.generate(prompts, sp, lora_request=LoRARequest("support", 1, adapter))]
    return plain, tuned


def paced_with_progress(model, batch, step):
    """``paced_causal_lm`` that also records the step each rank is computing, and on which Ray node,
    in ``<run dir>/progress/rank-<r>.json``: the multi-node test reads where the lost node was."""
    import json
    import os

    import ray
    import ray.train

    ctx = ray.train.get_context()
    folder = os.path.join(ctx.get_storage().experiment_fs_path, "progress")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank-{ctx.get_world_rank()}.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump({"step": step + 1, "node_id": ray.get_runtime_context().get_node_id()}, f)
    os.replace(f"{path}.tmp", path)
    return paced_causal_lm(model, batch, step)
