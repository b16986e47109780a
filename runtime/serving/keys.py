"""API keys for raylane's endpoints: where they come from and how replicas find them.

>>> sorted(load_api_keys({"RAYLANE_API_KEYS": "k1,k2"}))
['k1', 'k2']

Keys come from ``RAYLANE_API_KEYS`` (comma-separated) or the file named by
``RAYLANE_API_KEYS_FILE`` (one key per line or comma-separated, ``#`` starts a comment line, e.g.
a mounted Kubernetes secret). The file is re-read when it changes, so rotating the secret needs
no redeploy; emptying or deleting it revokes every key it held. Key values never travel in
Ray's control plane (``replica_key_env``): replicas read their own environment or the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping

from runtime.errors import AuthNotConfigured

ENV_KEYS = "RAYLANE_API_KEYS"
ENV_KEYS_FILE = "RAYLANE_API_KEYS_FILE"

log = logging.getLogger(__name__)


def _parse_keys(text: str) -> set[str]:
    keys: set[str] = set()
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        keys |= {k.strip() for k in line.split(",") if k.strip()}
    return keys


def _read_keys_file(path: str) -> set[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return _parse_keys(f.read())


def load_api_keys(environ: Mapping[str, str] | None = None) -> set[str]:
    """The accepted keys; raises ``AuthNotConfigured`` when neither variable gives one."""
    env = os.environ if environ is None else environ
    keys: set[str] = set()
    path = env.get(ENV_KEYS_FILE)
    if path:
        try:
            keys |= _read_keys_file(path)
        except OSError as e:
            raise AuthNotConfigured(
                f"{ENV_KEYS_FILE}={path} cannot be read: {e.strerror or e}",
                hint="mount the secret at that path on every node, or fix the variable",
            ) from None
    keys |= _parse_keys(env.get(ENV_KEYS, ""))
    if not keys:
        raise AuthNotConfigured(
            f"auth is 'api-key' but no API keys are configured ({ENV_KEYS} and {ENV_KEYS_FILE} are unset or empty)",
            hint=f"export {ENV_KEYS}=key1,key2 (or {ENV_KEYS_FILE}=/path/to/keys), or set `auth: none` in the spec "
            "for an open endpoint",
        )
    return keys


def key_source_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """Key settings that work but surprise (logged at start)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_KEYS) and env.get(ENV_KEYS_FILE):
        return [(f"both {ENV_KEYS} and {ENV_KEYS_FILE} are set: keys from both are accepted, and a key in "
                 f"{ENV_KEYS} cannot be revoked through the file; set only one")]
    return []


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeySource:
    """Accepted keys, refreshed from ``RAYLANE_API_KEYS_FILE`` when the file changes.

    Fails closed: a file that becomes empty (or only comments), unreadable or deleted revokes
    every key it held (keys from ``RAYLANE_API_KEYS`` stay). Keys are held as SHA-256 digests,
    so a lookup's timing says nothing about a key.
    """

    def __init__(self, environ: Mapping[str, str] | None = None, check_every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self._env = dict(os.environ if environ is None else environ)
        load_api_keys(self._env)  # at start, no keys (or an unreadable file) is an error, not "deny all"
        for warning in key_source_warnings(self._env):
            log.warning("raylane guard: %s", warning)
        self._path = self._env.get(ENV_KEYS_FILE)
        self._env_keys = _parse_keys(self._env.get(ENV_KEYS, ""))
        self._every, self._clock = check_every_s, clock
        self._signature = self._stat()
        self._set(self._read_file())
        self._next_check = clock() + check_every_s

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self._path) if self._path else None
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size) if st else None

    def _read_file(self) -> set[str]:
        if not self._path:
            return set()
        try:
            return _read_keys_file(self._path)
        except OSError:
            return set()

    def _set(self, file_keys: set[str]) -> None:
        self._keys = self._env_keys | file_keys
        self._digests = frozenset(_digest(k) for k in self._keys)

    def _refresh(self) -> None:
        if not self._path or self._clock() < self._next_check:
            return
        self._next_check = self._clock() + self._every
        signature = self._stat()
        if signature == self._signature:
            return
        self._signature = signature
        file_keys = self._read_file()
        if not file_keys:
            state = "missing or unreadable" if signature is None else "empty"
            log.error("raylane guard: %s=%s is %s: every key it held is revoked%s", ENV_KEYS_FILE, self._path,
                      state, "" if self._env_keys else " (no key is accepted now)")
        self._set(file_keys)

    def keys(self) -> set[str]:
        self._refresh()
        return self._keys

    def accepts(self, key: str) -> bool:
        self._refresh()
        return _digest(key) in self._digests


class StaticKeys:
    """A fixed set of keys (a caller's own list), matched by digest like ``KeySource``."""

    def __init__(self, keys: Iterable[str]):
        self._digests = frozenset(_digest(k) for k in keys)

    def accepts(self, key: str) -> bool:
        return _digest(key) in self._digests


def _inside_cluster() -> bool:
    """This process is a Ray worker (e.g. Serve building the app from a config on KubeRay)."""
    import sys

    if "ray" not in sys.modules:
        return False
    import ray

    try:
        return ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE
    except AttributeError:  # a Ray without that private layout: assume a driver
        return False


def _single_node_here() -> bool | None:
    """True when the cluster is one node and this process runs on it, False when not, None when
    this process is not connected to Ray yet (``serve run`` builds the app before connecting)."""
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    try:
        if ray.util.client.ray.is_connected():
            return False
        here = ray.get_runtime_context().get_node_id()
        alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - an unknown topology is treated as multi-node (nothing written)
        return False
    return alive == [here]


_written: dict[frozenset, str] = {}


def _private_keys_file(keys: set[str]) -> str:
    """A file only this user can read, holding ``keys``: what replicas on this machine read."""
    frozen = frozenset(keys)
    if frozen in _written and os.path.exists(_written[frozen]):
        return _written[frozen]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = os.path.join(base, f"raylane-keys-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if st.st_uid != os.getuid() or (st.st_mode & 0o077) or not os.path.isdir(folder) or os.path.islink(folder):
        raise AuthNotConfigured(f"{folder} is not a private folder of this user; refusing to write API keys there",
                                hint=f"remove it, or export {ENV_KEYS_FILE}=/path/to/a/keys/file")
    path = os.path.join(folder, f"keys-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(sorted(keys)) + "\n")
    _written[frozen] = path
    return path


def replica_key_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What to put in the replicas' ``runtime_env`` so they find this process's keys: at most
    a file path, never a key value (a runtime env is control-plane state: the Serve API, actor
    listings and runtime-env logs show it).

    - ``RAYLANE_API_KEYS_FILE`` set: its absolute path (the file must exist on every node).
    - Only ``RAYLANE_API_KEYS``, built inside the cluster (KubeRay, ``serve deploy``): nothing;
      the nodes' own environment has the keys (e.g. the secret in ``envFrom``).
    - Only ``RAYLANE_API_KEYS`` in a driver on a single-node cluster (``raylane run``,
      ``serve run``): the keys go to a file only this user can read, and its path travels.
    - A multi-node cluster: nothing; the nodes must have the keys themselves.
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_KEYS_FILE):
        return {ENV_KEYS_FILE: os.path.abspath(env[ENV_KEYS_FILE])}
    keys = _parse_keys(env.get(ENV_KEYS, ""))
    if not keys or _inside_cluster():
        return {}
    if _single_node_here() is False:
        log.warning("raylane: %s is set in this process only and the cluster has other nodes: key values are "
                    "never shipped to the cluster, so replicas read keys from their own environment (mount a "
                    "keys file on every node and set %s)", ENV_KEYS, ENV_KEYS_FILE)
        return {}
    return {ENV_KEYS_FILE: _private_keys_file(keys)}
