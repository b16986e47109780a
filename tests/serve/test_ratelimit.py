"""Unit tests: the shared rate limit (runtime.serving.ratelimit): the bucket and lease math, two
replicas sharing one store, failing open, and the Redis store on a real redis-server. No Ray."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from runtime.serving.guard import GuardMiddleware, RateLimiter
from runtime.serving.ratelimit import (
    Buckets,
    RedisStore,
    SharedRateLimiter,
    lease_size,
    limiter_for,
)
from runtime.specs import parse_spec
from tests.agent.conftest import redis_url  # noqa: F401  (the fixture: a real redis-server)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class MemoryStore:
    """``Buckets`` behind the async store interface (what the Ray actor wraps), counting calls."""

    def __init__(self, clock, fail: bool = False, delay: float = 0.0):
        self.buckets, self.fail, self.delay, self.calls = Buckets(clock), fail, delay, 0

    async def lease(self, bucket, want, returned, rpm, burst):
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("store down")
        return self.buckets.lease(bucket, want, returned, rpm, burst)


def test_lease_size():
    assert lease_size(600, 60) == 10  # one lease per second at the full rate
    assert lease_size(6000, 60) == 15  # at most a quarter of the burst
    assert lease_size(60, 40) == 1 and lease_size(600, 2) == 1  # at least 1


def test_bucket_take_grants_whole_tokens_and_takes_returns():
    clock = Clock()
    rl = RateLimiter(60, 10, clock)  # 1 token/s
    assert rl.take("k", 4) == (4, 0.0)
    assert rl.take("k", 10) == (6, 0.0)  # what is left, not more
    granted, wait = rl.take("k", 3)
    assert granted == 0 and wait == pytest.approx(1.0)
    clock.t += 2.5
    assert rl.take("k", 3) == (2, 0.0)  # 2.5 tokens refilled: 2 whole ones
    assert rl.take("k", 5, returned=3) == (3, 0.0)  # 0.5 + 3 given back
    clock.t += 100
    assert rl.take("k", 50, returned=50) == (10, 0.0)  # never above the burst


@pytest.mark.anyio
async def test_two_replicas_share_one_bucket():
    """Two replicas' limiters on one store admit the key's burst + rate x t in total, not twice."""
    clock = Clock()
    store = MemoryStore(clock)
    a, b = (SharedRateLimiter(store, 60, 20, clock=clock) for _ in range(2))
    assert a.lease == 1  # 1 token/s: leases of one token
    admitted = 0
    for i in range(60):  # alternate replicas, as a balancer does
        admitted += (await (a if i % 2 else b).acquire("key")) == 0.0
    assert admitted == 20  # a per-replica limiter would admit 40
    clock.t += 10.0  # 10 tokens refill (a refused key asks the store again once its wait is over)
    admitted = sum([(await (a if i % 2 else b).acquire("key")) == 0.0 for i in range(40)])
    assert admitted == 10
    assert (await a.acquire("other")) == 0.0  # other keys have their own bucket


@pytest.mark.anyio
async def test_leases_keep_store_calls_off_the_hot_path_and_bound_the_error():
    clock = Clock()
    store = MemoryStore(clock)
    a = SharedRateLimiter(store, 600, 1000, clock=clock)  # 10/s: leases of 10
    b = SharedRateLimiter(store, 600, 1000, clock=clock)
    assert a.lease == 10
    assert all([(await a.acquire("k")) == 0.0 for _ in range(100)])
    assert store.calls == 10  # one store call per 10 requests
    # b's tokens are taken from the same bucket: the total never exceeds what the bucket holds.
    await b.acquire("k")
    total = 100 + 10  # a used 100, b leased 10 (1 used)
    assert store.buckets._limiters[(600, 1000)]._tokens(a.bucket("k"), clock.t) == pytest.approx(1000 - total)
    # Unused leased tokens go back after the lease's time to live, with the next lease.
    clock.t += 1.5
    await b.acquire("k")
    assert store.buckets._limiters[(600, 1000)]._tokens(a.bucket("k"), clock.t) == pytest.approx(
        min(1000, 1000 - total + 9 + 15) - 10)


@pytest.mark.anyio
async def test_concurrent_requests_share_one_lease_call():
    clock = Clock()
    store = MemoryStore(clock, delay=0.01)
    limiter = SharedRateLimiter(store, 600, 1000, clock=clock)
    waits = await asyncio.gather(*(limiter.acquire("k") for _ in range(30)))
    assert waits == [0.0] * 30 and store.calls == 3  # 30 requests, leases of 10, one at a time


@pytest.mark.anyio
async def test_refused_key_is_refused_locally_until_its_wait():
    clock = Clock()
    store = MemoryStore(clock)
    limiter = SharedRateLimiter(store, 60, 1, clock=clock)
    assert await limiter.acquire("k") == 0.0
    calls = store.calls
    waits = [await limiter.acquire("k") for _ in range(50)]
    assert all(w > 0 for w in waits) and store.calls == calls + 1  # a flood costs one store call


@pytest.mark.anyio
async def test_store_unreachable_fails_open_to_a_per_replica_bucket(caplog):
    clock = Clock()
    store = MemoryStore(clock, fail=True)
    limiter = SharedRateLimiter(store, 60, 3, clock=clock, retry_s=5.0)
    with caplog.at_level(logging.WARNING, logger="ray.serve.raylane.ratelimit"):
        waits = [await limiter.acquire("k") for _ in range(5)]
    assert waits[:3] == [0.0] * 3 and all(w > 0 for w in waits[3:])  # the replica's own bucket still limits
    assert store.calls == 1 and "fail open" in caplog.text  # one warning, no store call per request
    store.fail = False
    clock.t += 6.0  # past retry_s: the store is asked again
    assert await limiter.acquire("k2") == 0.0 and store.calls == 2


@pytest.mark.anyio
async def test_slow_store_times_out_and_fails_open():
    clock = Clock()
    limiter = SharedRateLimiter(MemoryStore(clock, delay=1.0), 60, 3, clock=clock, timeout_s=0.05)
    assert await limiter.acquire("k") == 0.0  # served by the fallback, after 50 ms, not 1 s


@pytest.mark.anyio
async def test_guard_with_shared_limiter_answers_429_with_retry_after():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def ok(request):
        return PlainTextResponse("ok")

    clock = Clock()
    store = MemoryStore(clock)
    replicas = [GuardMiddleware(Starlette(routes=[Route("/v1/x", ok)]), keys={"k"},
                                limiter=SharedRateLimiter(store, 60, 2, clock=clock)) for _ in range(2)]
    codes = []
    for i in range(4):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=replicas[i % 2]), base_url="http://t") as c:
            r = await c.get("/v1/x", headers={"Authorization": "Bearer k"})
            codes.append(r.status_code)
    assert codes == [200, 200, 429, 429]
    assert r.headers["retry-after"] == "1"


def test_spec_store_fields():
    base = {"kind": "OnlineInference", "name": "chat", "model": "tiny", "auth": "none"}
    spec = parse_spec(base)
    assert spec.rate_limit.store == "actor"
    from runtime.errors import SpecError

    with pytest.raises(SpecError, match="store redis needs url"):
        parse_spec({**base, "rate_limit": {"store": "redis"}})
    with pytest.raises(SpecError, match="url is only read with store: redis"):
        parse_spec({**base, "rate_limit": {"url": "redis://h:6379/0"}})
    with pytest.raises(SpecError, match="store"):
        parse_spec({**base, "rate_limit": {"store": "memcached"}})
    assert isinstance(limiter_for(parse_spec({**base, "rate_limit": {"store": "replica"}}).rate_limit, "chat"),
                      RateLimiter)
    assert limiter_for(None, "chat") is None
    default = limiter_for(spec.rate_limit, "chat")  # what every replica's guard gets by default
    assert isinstance(default, SharedRateLimiter) and default.store.name == "raylane-ratelimit-chat"
    assert (default.requests_per_minute, default.burst, default.lease) == (600, 60, 10)


@pytest.mark.anyio
async def test_redis_store_shares_the_bucket_and_never_stores_the_key(redis_url):  # noqa: F811
    import redis

    stores = [RedisStore(redis_url, "rl-test"), RedisStore(redis_url, "rl-test")]
    a, b = (SharedRateLimiter(s, 60, 6) for s in stores)
    admitted = sum([(await (a if i % 2 else b).acquire("secret-key")) == 0.0 for i in range(20)])
    assert admitted == 6
    keys = [k.decode() for k in redis.Redis.from_url(redis_url).keys("raylane:ratelimit:rl-test:*")]
    assert keys == [f"raylane:ratelimit:rl-test:{a.bucket('secret-key')}"] and "secret-key" not in keys[0]
    granted, wait = await stores[0].lease(a.bucket("secret-key"), 1, 0, 60, 6)
    assert granted == 0 and 0 < wait <= 1.0


@pytest.mark.anyio
async def test_start_reaches_the_store_before_requests_and_logs_a_failure(caplog):
    clock = Clock()
    started = []

    class Store(MemoryStore):
        async def start(self):
            started.append(True)
            if self.fail:
                raise TimeoutError("no actor")

    await SharedRateLimiter(Store(clock), 60, 3, clock=clock).start()
    assert started == [True]
    with caplog.at_level(logging.WARNING, logger="ray.serve.raylane.ratelimit"):
        await SharedRateLimiter(Store(clock, fail=True), 60, 3, clock=clock).start()  # logged, not raised
    assert "not reachable at start" in caplog.text
