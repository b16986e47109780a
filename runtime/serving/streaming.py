"""Stream chunking between the engine replica and the ingress.

Every chunk crossing the replica -> ingress hop is a Ray message; with one message per token the
hops, not the engine, cap throughput on small machines. Batching chunks on a timer (ray.serve.llm's
``stream_batching_interval_ms``) saves messages but delays the first token by up to one interval.
``first_then_batched`` sends the first chunk at once (TTFT is what users feel), then batches the
rest: each batch waits ``interval_s`` after its first chunk, so time per output token is unchanged
on average and messages drop by the number of tokens one interval holds.

>>> import asyncio
>>> async def gen():
...     for i in range(3):
...         yield i
>>> async def collect():
...     return [b async for b in first_then_batched(gen(), 0.01)]
>>> asyncio.run(collect())
[[0], [1, 2]]
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


async def first_then_batched(source: AsyncIterator[T], interval_s: float) -> AsyncIterator[list[T]]:
    it = source.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        return
    yield [first]
    if interval_s <= 0:
        async for item in it:
            yield [item]
        return

    queue: asyncio.Queue = asyncio.Queue()
    failure: list[BaseException] = []

    async def pump():
        try:
            async for item in it:
                queue.put_nowait(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            failure.append(e)
        finally:
            queue.put_nowait(_DONE)

    task = asyncio.create_task(pump())
    try:
        done = False
        while not done:
            batch = [await queue.get()]
            if batch[0] is not _DONE:
                await asyncio.sleep(interval_s)
            while not queue.empty():
                batch.append(queue.get_nowait())
            done = batch[-1] is _DONE
            items = [x for x in batch if x is not _DONE]
            if items:
                yield items
        if failure:
            raise failure[0]
    finally:
        if not task.done():
            task.cancel()
