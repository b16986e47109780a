"""Does every Ray node see this folder? The check behind "SQLite only where every node shares it".

>>> from runtime.shared_paths import nodes_not_sharing
>>> nodes_not_sharing("/mnt/raylane/agents/helper")      # doctest: +SKIP
[]

A file-backed store (the agent shape's SQLite sessions) is safe on a multi-node cluster only if
the file is one file for every node: on a laptop, on a ReadWriteMany volume mounted at the same
path everywhere, on NFS. A path inside one machine's (or one pod's) disk gives each node its own
store, so a session lands on whichever node its actor runs on and is lost with that node.

``nodes_not_sharing`` asks the cluster instead of guessing from the path: it writes a marker with
a random token under the folder, runs one zero-CPU task pinned to each alive node that reads it
back, and names the nodes that did not read the same token. One node (a laptop) needs no check.
It covers the nodes alive when it runs; a node an autoscaler adds later is not re-checked.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from runtime.errors import RaylaneError

PROBE_TIMEOUT_S = 60.0


def _peek(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def nodes_not_sharing(directory: str, *, timeout_s: float = PROBE_TIMEOUT_S, nodes: list[str] | None = None,
                      peek: Callable[[list[str], str], dict[str, str | None]] | None = None) -> list[str]:
    """The alive Ray nodes (ids) that do not see the marker this process writes under ``directory``;
    [] when every node shares it, or when the cluster has one node. ``nodes`` defaults to the
    alive nodes of the connected cluster; ``peek(node_ids, marker_path)`` reads the marker on each
    node (default: a pinned Ray task per node)."""
    if nodes is None:
        import ray

        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return []
    folder = Path(directory).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    marker = folder / f".raylane-shared-{token[:12]}"
    marker.write_text(token)
    try:
        seen = peek(nodes, str(marker)) if peek else _peek_on_nodes(nodes, str(marker), timeout_s)
    finally:
        marker.unlink(missing_ok=True)
    return [n for n in nodes if seen.get(n) != token]


def _peek_on_nodes(nodes: list[str], marker: str, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, str | None]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(_peek)
    refs = {n: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(marker)
            for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    out: dict[str, str | None] = {}
    for node, ref in refs.items():
        try:
            out[node] = ray.get(ref) if ref in done else None
        except Exception:  # the node died meanwhile: it does not share anything
            out[node] = None
    return out


def require_shared(directory: str, *, field: str, fix: str, **kwargs) -> None:
    """Raise when some alive node does not see ``directory`` (see ``nodes_not_sharing``)."""
    missing = nodes_not_sharing(directory, **kwargs)
    if missing:
        shown = ", ".join(n[:12] for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise RaylaneError(
            f"{field}: {directory} is not shared by every Ray node ({len(missing)} cannot see it: {shown}); "
            "each node would keep its own copy, and whatever a lost node held would be lost with it",
            hint=fix,
        )
