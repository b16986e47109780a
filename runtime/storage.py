"""Storage roots: local folders and s3:// (or gs://) URIs through pyarrow filesystems.

>>> from runtime.storage import resolve, join, write_bytes_atomic
>>> fs, path = resolve("s3://bucket/prefix")          # doctest: +SKIP
>>> fs, path = resolve("~/.raylane/runs/x")            # LocalFileSystem, absolute path

Everything raylane writes for a run goes through here, so the same code works against a laptop
folder and an object store. Atomic writes use write-to-temporary-then-rename: on a local or POSIX
filesystem the rename is atomic; on object stores a single PUT is.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or URI."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so readers see either the old file or the whole new one, never a part."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(parent)  # the rename itself survives a power cut only once the folder is synced
        return
    with fs.open_output_stream(path) as f:  # one PUT on object stores: all or nothing
        f.write(data)


def fsync_dir(path: str) -> None:
    """Flush a local folder's entries (new names, renames) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder
    finally:
        os.close(fd)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly under ``uri`` (sorted), as paths within its filesystem."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
