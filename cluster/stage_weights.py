"""Stage one model onto the weight-cache PVC (run by the staging Job or the head's init container).

    python -m cluster.stage_weights --model tiny --dest /mnt/weights/tiny-8950abfd

Idempotent: when ``DEST/.raylane-staged`` exists it does nothing, so every run of the same model
shares one copy. Copies into a temporary sibling folder and renames it into place, then writes the
marker last: a crash leaves no half-staged folder that readers would trust.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from cluster.weights import MARKER


def stage(model: str, dest: str | Path, storage_root: str = "~/.raylane") -> Path:
    """Materialise ``model`` (tiny, folder, s3://..., models:/..., or a hub id) at ``dest``."""
    dest = Path(dest)
    if (dest / MARKER).is_file():
        print(f"{model} already staged at {dest}", file=sys.stderr)
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _materialise(model, tmp, storage_root)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (dest / MARKER).write_text(model + "\n")
    print(f"staged {model} at {dest}", file=sys.stderr)
    return dest


def _materialise(model: str, out: Path, storage_root: str) -> None:
    from runtime.models import is_tiny, resolve_model, tiny_seed

    if is_tiny(model):
        from runtime.tiny_model import write_tiny_model

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cluster.stage_weights", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--storage-root", default="~/.raylane")
    args = p.parse_args(argv)
    stage(args.model, args.dest, args.storage_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
