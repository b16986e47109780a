"""A per-key rate limit that holds across replicas: one token bucket per key in a store every node
reaches, and replicas that lease small batches of its tokens so the request path rarely leaves
the replica.

>>> limiter = limiter_for(spec.rate_limit, app="chat")      # doctest: +SKIP
>>> await limiter.acquire("key")                           # doctest: +SKIP
0.0

Stores (``rate_limit.store``):

- ``actor`` (default): a named, detached Ray actor per app (``raylane-ratelimit-<app>`` in
  namespace ``raylane``) pinned to the head node, so losing any worker node keeps the counters.
  It restarts if it dies (its buckets start full again).
- ``redis``: the same bucket as a Lua script on a Redis server (``rate_limit.url``), keyed by a
  hash of the API key, never the key itself.

Accuracy: a replica only admits requests with tokens taken from the shared bucket, so a key never
gets more than ``burst + rate x t`` in total. A replica holds at most ``lease`` unused tokens of a
key for at most ``LEASE_TTL_S`` (then gives them back), so a key may be refused up to
``(replicas - 1) x lease`` requests early. If the store does not answer within
``STORE_TIMEOUT_S`` the limiter fails open to a per-replica bucket (each replica admits the full
rate, as without a store: N replicas admit up to N x the rate) and logs a warning; it asks the
store again after ``STORE_RETRY_S``. A counter outage must not become a serving outage: auth stays
on, and the per-replica bucket still bounds every key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from runtime.serving.guard import RateLimiter

# Under "ray.serve" so the warning lands in the replica's log (Serve's handlers), not a worker's stderr.
log = logging.getLogger("ray.serve.raylane.ratelimit")

# A replica keeps leased tokens this long, then returns what is left with its next lease.
LEASE_TTL_S = 1.0
# The store must answer a lease this fast, else the replica limits on its own for a while.
STORE_TIMEOUT_S = 2.0
STORE_RETRY_S = 5.0
NAMESPACE = "raylane"


def lease_size(requests_per_minute: float, burst: int, ttl_s: float = LEASE_TTL_S) -> int:
    """Tokens a replica asks for at once: about one lease per ``ttl_s`` at the full rate, at most a
    quarter of the burst (so a few replicas cannot strand the whole burst), at least 1."""
    return max(1, min(math.ceil(requests_per_minute / 60.0 * ttl_s), burst // 4))


class CounterStore(Protocol):
    """The shared buckets: take up to ``want`` tokens of ``bucket`` (after adding back
    ``returned`` unused ones); returns (tokens granted, seconds until one is available when none)."""

    async def lease(self, bucket: str, want: int, returned: int, requests_per_minute: float,
                    burst: int) -> tuple[int, float]: ...


class Buckets:
    """The store's state: one ``RateLimiter`` per configuration (the actor keeps one of these)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._limiters: dict[tuple[float, int], RateLimiter] = {}

    def lease(self, bucket: str, want: int, returned: int, requests_per_minute: float, burst: int) -> tuple[int, float]:
        limiter = self._limiters.get((requests_per_minute, burst))
        if limiter is None:
            limiter = self._limiters[(requests_per_minute, burst)] = RateLimiter(requests_per_minute, burst, self.clock)
        return limiter.take(bucket, want, returned)


class ActorStore:
    """``Buckets`` in a named detached Ray actor on the head node, created by the first replica."""

    def __init__(self, app: str):
        self.name = f"raylane-ratelimit-{app}"
        self._handle = None

    def _actor(self):
        if self._handle is None:
            import ray

            cls = ray.remote(Buckets)
            self._handle = cls.options(
                name=self.name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
                # The head node: it lives as long as the cluster (a worker node may go any time).
                resources={"node:__internal_head__": 0.001}, max_restarts=-1, max_task_retries=0,
                # Not in the creating replica's placement group (Ray would capture it there).
                scheduling_strategy="DEFAULT",
            ).remote()
        return self._handle

    async def start(self, timeout_s: float = 120.0) -> None:
        """Create (or find) the actor and wait until it answers: a replica calls this while it
        starts, so its first requests do not wait for an actor process to start (they would fail
        open instead)."""
        handle = await asyncio.to_thread(self._actor)
        await asyncio.wait_for(handle.lease.remote("", 0, 0, 60.0, 1), timeout_s)

    async def lease(self, bucket, want, returned, requests_per_minute, burst):
        handle = self._handle or await asyncio.to_thread(self._actor)
        try:
            return tuple(await handle.lease.remote(bucket, want, returned, requests_per_minute, burst))
        except Exception:
            self._handle = None  # look the actor up again next time (it may have been restarted)
            raise


# KEYS[1] the bucket; ARGV: want, returned, tokens/s, burst. Redis's own clock, so replicas on
# machines with skewed clocks share one timeline. Returns {granted, wait seconds as a string}.
_LEASE_LUA = """
local want, returned, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate + returned)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
local wait = 0
if granted == 0 then wait = (1 - tokens) / rate end
return {granted, tostring(wait)}
"""


class RedisStore:
    """The bucket as a Lua script on Redis (atomic per key), under ``raylane:ratelimit:<app>:``."""

    def __init__(self, url: str, app: str):
        import redis.asyncio as aredis

        self._r = aredis.Redis.from_url(url, socket_connect_timeout=STORE_TIMEOUT_S, socket_timeout=STORE_TIMEOUT_S)
        self._script = self._r.register_script(_LEASE_LUA)
        self.prefix = f"raylane:ratelimit:{app}:"

    async def lease(self, bucket, want, returned, requests_per_minute, burst):
        granted, wait = await self._script(keys=[self.prefix + bucket],
                                           args=[want, returned, requests_per_minute / 60.0, burst])
        return int(granted), float(wait)


class SharedRateLimiter:
    """The guard's limiter with a ``CounterStore`` behind it: ``await acquire(key)`` is 0 when the
    request may go, else the seconds to wait (Retry-After). Local leases make most requests free of
    any store call; a refused key is refused locally until its wait is over."""

    def __init__(self, store: CounterStore, requests_per_minute: float, burst: int, *,
                 lease: int | None = None, ttl_s: float = LEASE_TTL_S, timeout_s: float = STORE_TIMEOUT_S,
                 retry_s: float = STORE_RETRY_S, clock: Callable[[], float] = time.monotonic):
        self.store, self.requests_per_minute, self.burst = store, requests_per_minute, burst
        self.lease = lease or lease_size(requests_per_minute, burst, ttl_s)
        self.ttl_s, self.timeout_s, self.retry_s, self.clock = ttl_s, timeout_s, retry_s, clock
        self.fallback = RateLimiter(requests_per_minute, burst, clock)  # while the store is unreachable
        self._held: dict[str, tuple[int, float]] = {}  # bucket -> (tokens, expires)
        self._refused: dict[str, float] = {}  # bucket -> refused until
        self._pending: dict[str, asyncio.Future] = {}  # bucket -> the lease under way
        self._down_until = 0.0
        self.store_calls = 0

    async def start(self) -> None:
        """Reach the store before the first request (``ActorStore.start``); a failure is logged and
        requests fail open until the store answers."""
        start = getattr(self.store, "start", None)
        if start is None:
            return
        try:
            await start()
        except Exception as e:
            log.warning("rate-limit store not reachable at start (%s: %s); requests fail open until it is",
                        type(e).__name__, e)

    @staticmethod
    def bucket(key: str) -> str:
        """The store's name for a key: a hash (API keys never leave the replica)."""
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    async def acquire(self, key: str) -> float:
        b = self.bucket(key)
        while True:
            now = self.clock()
            tokens, expires = self._held.get(b, (0, 0.0))
            if tokens > 0 and now < expires:
                self._held[b] = (tokens - 1, expires)
                return 0.0
            refused = self._refused.get(b, 0.0)
            if refused > now:
                return refused - now
            if self._down_until > now:
                return self.fallback.acquire(key)
            pending = self._pending.get(b)
            if pending is None:
                break
            await asyncio.shield(pending)  # one lease per key at a time; then look again
        return await self._lease(key, b, now)

    async def _lease(self, key: str, b: str, now: float) -> float:
        done = asyncio.get_running_loop().create_future()
        self._pending[b] = done
        tokens, expires = self._held.pop(b, (0, 0.0))
        self._refused.pop(b, None)
        try:
            self.store_calls += 1
            granted, wait = await asyncio.wait_for(
                self.store.lease(b, self.lease, tokens, self.requests_per_minute, self.burst), self.timeout_s)
        except Exception as e:
            self._down_until = now + self.retry_s
            log.warning("rate-limit store unreachable (%s: %s); limiting per replica for %.0f s (fail open)",
                        type(e).__name__, e, self.retry_s)
            return self.fallback.acquire(key)
        finally:
            del self._pending[b]
            done.set_result(None)
        if len(self._held) > 4 * 65536:  # keys seen once long ago hold nothing worth keeping
            self._held.clear()
            self._refused.clear()
        now = self.clock()
        if granted >= 1:
            self._held[b] = (granted - 1, now + self.ttl_s)
            return 0.0
        wait = max(float(wait), 1e-3)
        self._refused[b] = now + wait
        return wait


def limiter_for(rate_limit: Any, app: str) -> RateLimiter | SharedRateLimiter | None:
    """The limiter a replica of ``app`` uses for ``rate_limit`` (a ``RateLimitSpec`` or None)."""
    if rate_limit is None:
        return None
    rpm, burst = rate_limit.requests_per_minute, rate_limit.burst
    if rate_limit.store == "replica":
        return RateLimiter(rpm, burst)
    store = RedisStore(rate_limit.url, app) if rate_limit.store == "redis" else ActorStore(app)
    return SharedRateLimiter(store, rpm, burst)
