"""The two training recipes: what differs between ``Training`` and ``FineTune``; the harness
(``runtime.training.loop``) does everything else the same for both.

>>> from runtime.training.recipes import recipe_for
>>> recipe = recipe_for(spec, storage_root)      # CausalLMRecipe or LoraRecipe  # doctest: +SKIP
>>> model = recipe.build(seed=0)                  # in each Ray Train worker       # doctest: +SKIP

A recipe is plain data (it travels to the workers in the train loop config) with four duties:
the tokenizer it trains with, the model it builds, how it reloads its checkpointed weights, and
the registry params that describe it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import RaylaneError
from runtime.models import resolve_model
from runtime.specs import FineTuneSpec, TrainingSpec


@dataclass
class CausalLMRecipe:
    """``Training``: a Llama built from the spec's model config, trained from scratch."""

    model_config: dict[str, Any]
    tokenizer_dir: str
    vocab_size: int
    name: str = "causal_lm"

    @classmethod
    def from_spec(cls, spec: TrainingSpec, root: str) -> CausalLMRecipe:
        m = spec.model
        return cls(
            model_config={
                "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
                "num_key_value_heads": m.num_kv_heads, "intermediate_size": m.intermediate_size,
                "vocab_size": m.vocab_size, "max_position_embeddings": m.max_position_embeddings,
                "head_dim": m.hidden_size // m.num_heads, "tie_word_embeddings": True,
            },
            tokenizer_dir=resolve_model("tiny", root) if m.tokenizer == "tiny" else m.tokenizer,
            vocab_size=m.vocab_size,
        )

    @property
    def base_model(self) -> str | None:
        return None

    def adopt(self, tok) -> None:
        """Check the tokenizer against the config and take its special token ids."""
        if len(tok) > self.vocab_size:
            raise RaylaneError(f"model.vocab_size {self.vocab_size} is smaller than the tokenizer's {len(tok)}",
                               hint=f"set model.vocab_size: {len(tok)} or more")
        self.model_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)

    def build(self, seed: int):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**self.model_config))

    def checkpoint_tokenizer(self):
        """A full-model checkpoint carries its tokenizer (loaded once per worker)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def load_weights(self, model, directory: str) -> None:
        from safetensors.torch import load_file

        state = load_file(os.path.join(directory, "model.safetensors"))
        model.load_state_dict(state, strict=False)  # tied embeddings are saved once

    def params(self) -> dict[str, Any]:
        return {}  # the spec (registered beside the weights) has the config


@dataclass
class LoraRecipe:
    """``FineTune``: a base causal LM wrapped in a peft LoRA adapter; only the adapter trains."""

    base_model_dir: str
    lora: dict[str, Any] = field(default_factory=dict)
    name: str = "lora"

    @classmethod
    def from_spec(cls, spec: FineTuneSpec, root: str) -> LoraRecipe:
        base = resolve_model(spec.base_model, root)
        if (Path(base) / "adapter_config.json").is_file():
            raise RaylaneError(f"base_model {spec.base_model!r} is a LoRA adapter, not a full model",
                               hint="fine-tune from the adapter's base model (its adapter_config.json names it)")
        return cls(base_model_dir=base, lora=spec.lora.model_dump())

    @property
    def base_model(self) -> str | None:
        return self.base_model_dir

    @property
    def tokenizer_dir(self) -> str:
        return self.base_model_dir

    def adopt(self, tok) -> None:
        """The base model's own tokenizer: nothing to check."""

    def build(self, seed: int):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(self.base_model_dir, dtype=torch.float32)
        lora = self.lora
        return get_peft_model(base, LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"], task_type="CAUSAL_LM",
        ))

    def checkpoint_tokenizer(self):
        """An adapter checkpoint needs no tokenizer (the base model has it)."""
        return None

    def load_weights(self, model, directory: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(os.path.join(directory, "adapter_model.safetensors")))

    def params(self) -> dict[str, Any]:
        return {f"lora.{k}": v for k, v in self.lora.items()}


Recipe = CausalLMRecipe | LoraRecipe


def recipe_for(spec: TrainingSpec | FineTuneSpec, root: str) -> Recipe:
    """The recipe of a training spec (the one place the two training shapes differ)."""
    if isinstance(spec, FineTuneSpec):
        return LoraRecipe.from_spec(spec, root)
    return CausalLMRecipe.from_spec(spec, root)
