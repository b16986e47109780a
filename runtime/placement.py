"""Gang placement: all workers of a job in one Ray placement group, or a clear error in bounded time.

>>> from runtime.placement import gang_bundles, reserve_gang
>>> bundles = gang_bundles(spec.resources)                       # doctest: +SKIP
>>> with reserve_gang(bundles, "PACK", timeout_s=60): ...        # doctest: +SKIP

Ray would otherwise wait forever for a gang that cannot fit (a worker per node on a 1-node
cluster, 8 GPUs on a 4-GPU node). ``reserve_gang`` asks for the whole gang and, if Ray cannot grant
it in time, raises ``PlacementTimeout`` naming what is missing: how much of which resource, or
how many more nodes a STRICT_SPREAD gang needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from runtime.errors import PlacementTimeout

STRATEGIES = ("PACK", "STRICT_PACK", "STRICT_SPREAD", "SPREAD")
ACCELERATOR_PREFIX = "accelerator_type:"  # Ray's resource on a node with that accelerator


def gang_bundles(resources) -> list[dict[str, float]]:
    """One bundle per worker from a spec's ``resources`` section."""
    bundle: dict[str, float] = {"CPU": float(resources.cpus_per_worker)}
    if resources.gpus_per_worker:
        bundle["GPU"] = float(resources.gpus_per_worker)
    if resources.memory_gb_per_worker:
        bundle["memory"] = float(resources.memory_gb_per_worker) * 2**30
    if resources.accelerator_type:
        bundle[f"{ACCELERATOR_PREFIX}{resources.accelerator_type}"] = 0.001
    return [dict(bundle) for _ in range(resources.num_workers)]


def _fmt(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / 2**30:.3g} GiB memory"
    return f"{value:g} {key}"


def missing_resources(bundles: list[dict[str, float]], strategy: str, nodes: list[dict[str, float]]) -> list[str]:
    """Why ``bundles`` cannot be placed with ``strategy`` on nodes with these *total* resources.

    Pure logic (no Ray), so it is unit-tested on made-up clusters.
    """
    problems: list[str] = []
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    for k, v in need.items():
        if k.startswith(ACCELERATOR_PREFIX) and not have[k]:
            types = sorted({r[len(ACCELERATOR_PREFIX):] for n in nodes for r in n if r.startswith(ACCELERATOR_PREFIX)})
            problems.append(f"no node has accelerator type {k[len(ACCELERATOR_PREFIX):]} (resources.accelerator_type); "
                            f"the cluster's nodes have: {', '.join(types) or 'none'}")
        elif have[k] + 1e-9 < v:
            problems.append(f"the gang needs {_fmt(k, v)} in total, the cluster has {_fmt(k, have[k])} "
                            f"(missing {_fmt(k, v - have[k])})")
    fits = [n for n in nodes if all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundles[0].items())] if bundles else nodes
    if strategy == "STRICT_SPREAD" and len(fits) < len(bundles):
        problems.append(f"STRICT_SPREAD needs {len(bundles)} nodes that each fit one worker "
                        f"({', '.join(_fmt(k, v) for k, v in bundles[0].items())}); the cluster has {len(fits)} "
                        f"(missing {len(bundles) - len(fits)} node(s))")
    if strategy == "STRICT_PACK" and not any(
        all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for n in nodes
    ):
        biggest = max(nodes, key=lambda n: n.get("CPU", 0.0), default={})
        problems.append(f"STRICT_PACK needs one node with {', '.join(_fmt(k, v) for k, v in need.items())}; "
                        f"the largest node has {', '.join(_fmt(k, biggest.get(k, 0.0)) for k in need)}")
    return problems


def _node_totals() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


@contextlib.contextmanager
def reserve_gang(bundles: list[dict[str, float]], strategy: str = "PACK", *, timeout_s: float = 60.0,
                 name: str = "") -> Iterator[object]:
    """Reserve the gang as one placement group for the duration of the block (Ray must be initialised).

    Raises ``PlacementTimeout`` if it is not granted within ``timeout_s`` seconds.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    pg = placement_group(bundles, strategy=strategy, name=name)
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            nodes = _node_totals()
            available = ", ".join(
                _fmt(k, v) for k, v in sorted(ray.available_resources().items()) if k in bundles[0]
            )
            problems = missing_resources(bundles, strategy, nodes) or [
                f"the cluster has the resources in total, but other jobs hold them (available now: {available})"
            ]
            raise PlacementTimeout(
                f"could not place {len(bundles)} worker(s) ({strategy}) within {timeout_s:g} s: " + "; ".join(problems),
                hint="lower resources.num_workers / cpus_per_worker / gpus_per_worker, change placement.strategy, "
                "add nodes, or raise placement.timeout_s if the autoscaler is adding them",
            )
        yield pg
    finally:
        remove_placement_group(pg)


def check_gang(resources, strategy: str = "PACK", timeout_s: float = 60.0) -> None:
    """Fail fast when the gang cannot be placed; releases the reservation for the engine to take."""
    with reserve_gang(gang_bundles(resources), strategy, timeout_s=timeout_s):
        pass
