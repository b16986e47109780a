"""raylane's embedded model: a tiny random-weight Llama that loads in transformers, peft and vLLM.

No model hub is reachable from many clusters (nor from CI), so raylane writes its own default
model: a Llama config with head_dim 64 (vLLM's CPU attention rejects 16), a byte-level BPE
tokenizer trained here on a fixed text, and a chat template. The same seed gives the same bytes.

>>> from runtime.tiny_model import write_tiny_model
>>> path = write_tiny_model("/tmp/tiny", seed=0)   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

TINY_MODEL_VERSION = 1

# A fixed corpus so the tokenizer's merges (and therefore the model's vocabulary) are reproducible.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ray runs training, batch inference, online serving and agents on one cluster.",
    "vLLM serves large language models with paged attention and continuous batching.",
    "A LoRA adapter changes a few low-rank matrices of a frozen base model.",
    "Kubernetes schedules pods; KubeRay turns RayJob and RayService objects into Ray clusters.",
    "Checkpoints are written every few steps so a killed worker resumes where it stopped.",
    "Hello! How can I help you today? Please answer in one short sentence.",
    "user assistant system tool: {\"name\": \"calculator\", \"arguments\": {\"expression\": \"2+2\"}}",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } , . ; : ? ! ' \" # @ % & _",
    "Customer record enrichment, fraud scoring, support copilots and nightly reports.",
]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlamaConfig:
    hidden_size: int = 128
    num_attention_heads: int = 2  # head_dim = 128 / 2 = 64, the smallest vLLM CPU accepts
    num_key_value_heads: int = 1
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 2048


def write_tiny_model(
    out_dir: str | Path, seed: int = 0, config: TinyLlamaConfig | None = None, overwrite: bool = False
) -> Path:
    """Write the tiny Llama (weights, config, tokenizer, chat template) to ``out_dir``.

    Deterministic for a given seed and config. If ``out_dir`` already holds the same model
    (same seed, config and version) it is left alone, so callers can use it as a cache.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = config or TinyLlamaConfig()
    out = Path(out_dir).expanduser().resolve()
    marker = out / "raylane_tiny_model.json"
    stamp = {"version": TINY_MODEL_VERSION, "seed": seed, "config": asdict(config)}
    if not overwrite and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(config.vocab_size)
    tokenizer.save_pretrained(out)

    hf_config = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        num_hidden_layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    marker.write_text(json.dumps(stamp, indent=2, sort_keys=True))
    return out


def model_fingerprint(model_dir: str | Path) -> str:
    """A short content hash of the weights and tokenizer files (for lineage and tests)."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for name in sorted(["model.safetensors", "tokenizer.json", "config.json"]):
        p = root / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
