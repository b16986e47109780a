"""The embedded tiny model: deterministic, and loadable by transformers and peft (vLLM: e2e test)."""

import json

import pytest

from runtime.tiny_model import model_fingerprint, write_tiny_model
from tests.conftest import run_cli


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_model):
    again = write_tiny_model(tmp_path / "a", seed=0)
    other = write_tiny_model(tmp_path / "b", seed=1)
    assert model_fingerprint(again) == model_fingerprint(tiny_model)
    assert model_fingerprint(other) != model_fingerprint(tiny_model)
    # the tokenizer does not depend on the seed
    assert (again / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_config_has_vllm_cpu_compatible_head_dim(tiny_model):
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert cfg["num_key_value_heads"] == 1 and cfg["num_hidden_layers"] == 2


def test_loads_in_transformers_with_chat_template(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert len(tok) <= model.config.vocab_size
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    # byte-level BPE: any text round-trips, including bytes outside the training corpus
    s = "Grüße, 世界! {\"a\": 1}"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    ids = tok("Ray runs", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_loads_in_peft(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total


def test_cli_tiny_model_json(tmp_path, tiny_model):
    r = run_cli("tiny-model", str(tmp_path / "m"), "--seed", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fingerprint"] == model_fingerprint(tiny_model)
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize("ref", ["tiny", "tiny:3"])
def test_resolve_model_writes_tiny_under_storage_root(tmp_path, ref):
    from runtime.models import resolve_model

    path = resolve_model(ref, str(tmp_path))
    assert path.startswith(str(tmp_path)) and (tmp_path / "models").is_dir()
    assert json.loads((tmp_path / "models" / path.split("/")[-1] / "raylane_tiny_model.json").read_text())["seed"] == (3 if ":" in ref else 0)


def test_resolve_model_rejects_missing_folder(tmp_path):
    from runtime.errors import RaylaneError
    from runtime.models import resolve_model

    with pytest.raises(RaylaneError, match="not a folder"):
        resolve_model(str(tmp_path / "missing"))
