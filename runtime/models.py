"""Model references: what a spec's ``model:`` field may say, resolved to what vLLM or Ray Train loads.

- ``tiny`` or ``tiny:SEED``: raylane's embedded random-weight Llama, written under the storage root
- a local folder with a Hugging Face model (config.json + weights + tokenizer), or a LoRA adapter folder
- ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the MLflow model registry (a local copy)
- a remote URI (``s3://...``): passed through for the engine to read

``stage_model`` copies any of these once into a folder (the KubeRay weight cache).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from runtime.defaults import DEFAULT_STORAGE_ROOT
from runtime.errors import RaylaneError
from runtime.registry import resolve_registry_uri
from runtime.tiny_model import write_tiny_model

TINY = "tiny"
# Written last into a staged weights folder: readers trust only folders that have it.
WEIGHTS_MARKER = ".raylane-staged"


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


def resolve_model(ref: str, storage_root: str = DEFAULT_STORAGE_ROOT) -> str:
    """A local folder (or remote URI vLLM can read) for a model reference."""
    if is_tiny(ref):
        seed = tiny_seed(ref)
        return str(write_tiny_model(tiny_model_dir(storage_root, seed), seed=seed))
    if ref.startswith("models:/"):
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


def stage_model(model: str, dest: str | Path, storage_root: str = DEFAULT_STORAGE_ROOT) -> Path:
    """Materialise ``model`` (tiny, folder, s3://..., models:/..., or a hub id) at ``dest``, once.

    Idempotent: when ``dest`` has the marker it does nothing, so every run of the same model
    shares one copy. Copies into a temporary sibling folder, renames it into place, then writes
    the marker last: a crash leaves no half-staged folder that readers would trust.
    """
    dest = Path(dest)
    if (dest / WEIGHTS_MARKER).is_file():
        print(f"{model} already staged at {dest}", file=sys.stderr)
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _materialise(model, tmp, storage_root)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (dest / WEIGHTS_MARKER).write_text(model + "\n")
    print(f"staged {model} at {dest}", file=sys.stderr)
    return dest


def _materialise(model: str, out: Path, storage_root: str) -> None:
    if is_tiny(model):
        write_tiny_model(out, seed=tiny_seed(model))
        return
    if "://" in model:
        import pyarrow.fs as pafs

        from runtime.storage import resolve

        fs, path = resolve(model)
        out.mkdir(parents=True)
        pafs.copy_files(
            path, str(out), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        return
    if model.startswith("models:/") or Path(model).expanduser().is_dir():
        shutil.copytree(resolve_model(model, storage_root), out)
        return
    from huggingface_hub import snapshot_download  # an org/name hub id

    snapshot_download(model, local_dir=str(out))
