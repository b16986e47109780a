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
