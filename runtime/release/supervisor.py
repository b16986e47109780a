"""Each serving replica makes sure its app's rollout has a controller, on the replica's own cluster.

>>> from runtime.release.supervisor import supervise
>>> task = asyncio.ensure_future(supervise("chat", "/mnt/raylane"))   # in a replica  # doctest: +SKIP

A rollout can be started from anywhere that sees the storage root (a laptop with an s3:// root, a
FineTune's gate in a RayJob on another cluster, a notebook): it is only a state file. The cluster
that serves the app is the one place its controller belongs, so every replica checks every
``every_s`` seconds and starts the detached controller actor when a progressing rollout
(``rollout.controller: cluster``) has none. Ray's named ``get_if_exists`` makes N replicas
starting it at once end with one actor.
"""

from __future__ import annotations

import asyncio
import logging

from runtime.release.state import RolloutState, RolloutStore

log = logging.getLogger(__name__)
CHECK_S = 5.0


def needs_controller(state: RolloutState | None) -> bool:
    """A progressing rollout, or a finished base-model one whose candidate engine is not wound
    down yet (its app to delete, or the champion app to hand over to)."""
    if state is None or state.config.get("controller", "cluster") != "cluster":
        return False
    return not state.done or state.winding_down


def ensure_controller(name: str, storage_root: str) -> bool:
    """Start rollout ``name``'s controller unless one is running; True when this call started it.
    A controller whose loop has ended (its rollout finished) still holds the actor name: it is
    replaced, or the next rollout of the app would find it and never move."""
    import time

    import ray

    from runtime.release.controller import NAMESPACE, actor_name, start_controller

    try:
        handle = ray.get_actor(actor_name(name), namespace=NAMESPACE)
    except ValueError:
        handle = None
    if handle is not None:
        try:
            if ray.get(handle.info.remote(), timeout=30)["running"]:
                return False
        except Exception:  # noqa: BLE001 - dead or unreachable: replace it
            pass
        ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the name is free once the actor is gone
            try:
                ray.get_actor(actor_name(name), namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.2)
    start_controller(name, storage_root)  # get_if_exists settles a race between replicas
    return True


async def supervise(app: str, storage_root: str, every_s: float = CHECK_S) -> None:
    """Forever: start app ``app``'s rollout controller when a rollout needs one."""
    from runtime.errors import RaylaneError

    store = RolloutStore(storage_root)
    refused: str | None = None  # a rollout the controller refused: said once, not every turn
    while True:
        state = None
        try:
            state = await asyncio.to_thread(store.get, app)
            if needs_controller(state) and state.rollout_id != refused:
                if await asyncio.to_thread(ensure_controller, app, storage_root):
                    log.info("rollout %s: started its controller on this cluster", app)
        except RaylaneError as e:  # the controller refuses this rollout (e.g. checks it cannot run)
            refused = state.rollout_id if state is not None else None
            log.warning("rollout %s: its controller refuses it: %s", app, e)
        except Exception as e:  # storage or GCS hiccup: keep serving, try the next turn
            log.warning("rollout %s: cannot check its controller: %s", app, e)
        await asyncio.sleep(every_s)
