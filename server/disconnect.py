"""The race against a client that goes away: work runs until it ends or `http.disconnect` arrives, whichever is
first, and a vanished client cancels the work at once (which aborts its engine sequences and frees their KV).

One helper for both places that need it: the generation handlers before a response starts (`server.app`, like
vLLM's `with_cancellation`) and a streaming body while it is sent (`server.serving.SSEResponse`), whatever the
ASGI spec version the server speaks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


async def until_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected (other messages, e.g. more body, are skipped)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(work: Awaitable[T], receive: Receive) -> asyncio.Future[T] | None:
    """Run `work` against the client's disconnect. Returns its finished future (its result or exception is the
    caller's to take), or None when the client went away first: `work` was then cancelled and has ended. If the
    caller itself is cancelled, so is `work`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        finished = task.done()  # a task that ended together with the disconnect still counts as ended
        if not finished:
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return task if finished else None
