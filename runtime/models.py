"""Model references: what a spec's ``model:`` field may say, resolved to a local folder.

- ``tiny`` or ``tiny:SEED``: raylane's embedded random-weight Llama, written under the storage root
- a local folder with a Hugging Face model (config.json + weights + tokenizer)
- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the MLflow model registry
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import RaylaneError

TINY = "tiny"


def is_tiny(ref: str) -> bool:
    return ref == TINY or ref.startswith(TINY + ":")


def tiny_seed(ref: str) -> int:
    _, _, seed = ref.partition(":")
    try:
        return int(seed) if seed else 0
    except ValueError:
        raise RaylaneError(f"bad tiny model reference {ref!r}", hint="use 'tiny' or 'tiny:SEED', e.g. 'tiny:1'") from None


def tiny_model_dir(storage_root: str, seed: int = 0) -> Path:
    return Path(storage_root).expanduser().resolve() / "models" / f"tiny-llama-seed{seed}"


def resolve_model(ref: str, storage_root: str = "~/.raylane") -> str:
    """A local folder (or remote URI vLLM can read) for a model reference."""
    if is_tiny(ref):
        from runtime.tiny_model import write_tiny_model

        seed = tiny_seed(ref)
        return str(write_tiny_model(tiny_model_dir(storage_root, seed), seed=seed))
    if ref.startswith("models:/"):
        try:
            from runtime.registry import resolve_registry_uri  # arrives with the model registry
        except ImportError:
            raise RaylaneError(
                f"model {ref!r} is a registry alias, but this raylane has no model registry",
                hint="use a model folder or 'tiny'",
            ) from None
        return resolve_registry_uri(ref, storage_root)
    if "://" in ref:
        return ref
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise RaylaneError(
            f"model {ref!r} is not a folder",
            hint="give a folder with config.json and weights, 'tiny' for the embedded model, or models:/NAME@ALIAS",
        )
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise RaylaneError(f"model folder {ref!r} has no config.json", hint="point at a Hugging Face model folder")
    return str(path.resolve())
