"""Deadlines enforced by the engine loop, and the write timeout: a client that stops reading still has its
request ended and its KV freed.

Nothing here bets on speed. The engine loop tests run fake engines whose steps the test controls. The live tests
hold the engine with a StepGate until the deadline has certainly passed (the request cannot have finished), and
stall the response's body sends with `StalledBody`, which is what uvicorn's send does for a client that reads
nothing: it waits for the transport to drain. A stalled handler never reads its request's outputs, so only the
engine can end the request; before the engine owned deadlines, these requests ran to max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.commands import Add
from engine.events import Expired, Outputs
from engine.loop import Deadlines
from engine.sequence import RequestOutput, SamplingParams, StepStats
from server.app import create_app
from server.async_engine import AsyncEngine
from server.config import ServerConfig
from server.transport import ThreadTransport
from tests.server.conftest import make_engine
from tests.server.gate import StepGate
from tests.server.helpers import drain, metric
from tests.server_fixtures import live_server

BOUND = 30.0  # seconds: a "does not hang" bound, far above any deadline under test
NEVER_READ = {"prompt": "Never read", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}


# ---- the engine loop, over a ThreadTransport and fake engines --------------------------------------------------------
class FakeEngine:
    """Steps emit one token per running request until max_tokens. `parked` requests are held but not runnable:
    the engine reports no work, so the loop blocks on its commands (as an idle engine does)."""

    tokenizer = None
    model_name = "fake"
    max_model_len = 64
    num_waiting = 0
    kv_cache_usage = 0.0

    def __init__(self, parked: bool = False) -> None:
        self.parked = parked
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.last_stats = StepStats()

    @property
    def num_running(self) -> int:
        return len(self.requests)

    def admit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        self.requests[request_id] = [params.max_tokens, 0]

    def abort_request(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests) and not self.parked

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        outs = []
        for rid, entry in list(self.requests.items()):
            entry[1] += 1
            done = entry[1] >= entry[0]
            outs.append(RequestOutput(rid, [7], "length" if done else None, None, 1, entry[1], entry[1], entry[1],
                                      "ar"))
            if done:
                del self.requests[rid]
        return outs

    def probe(self) -> None:
        pass


@contextmanager
def loop_over(engine: FakeEngine) -> Iterator[tuple[ThreadTransport, queue.SimpleQueue]]:
    """run_engine_loop in a ThreadTransport over `engine`; yields it and the queue of (time, event) it emits."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    core = ThreadTransport(engine)
    core.start(lambda event: events.put((time.monotonic(), event)))
    try:
        yield core, events
    finally:
        core.stop(BOUND)


def next_event(events: queue.SimpleQueue, kind: type) -> tuple[float, Any]:
    """The next event of type `kind` (skipping others) and when it came; fails after BOUND seconds."""
    stop = time.monotonic() + BOUND
    while True:
        at, event = events.get(timeout=max(0.0, stop - time.monotonic()))
        if isinstance(event, kind):
            return at, event


def test_an_idle_blocked_loop_wakes_up_to_expire_a_request_at_its_deadline() -> None:
    engine = FakeEngine(parked=True)
    with loop_over(engine) as (core, events):
        deadline = time.monotonic() + 0.2
        core.send(Add("parked-0", [1], SamplingParams(max_tokens=5), time.monotonic(), deadline))
        at, expired = next_event(events, Expired)
        assert expired.request_ids == ["parked-0"] and engine.aborted == ["parked-0"]
        assert at >= deadline  # never early
        assert engine.steps == 0 and expired.snapshot.num_running == 0


class Clock:
    """A stand-in for the engine loop's `time` module: the test decides when deadlines pass."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_due_requests_are_aborted_before_the_next_step_and_finished_ones_never_expire(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr("engine.loop.time", clock)
    engine = FakeEngine()
    with loop_over(engine) as (core, events):
        core.send(Add("late-0", [1], SamplingParams(max_tokens=50), clock.now, clock.now - 1))  # due on arrival
        _, expired = next_event(events, Expired)
        assert expired.request_ids == ["late-0"] and engine.steps == 0  # aborted before any step ran it

        core.send(Add("quick-0", [1], SamplingParams(max_tokens=2), clock.now, clock.now + 10))
        outs: list[RequestOutput] = []
        while not outs or outs[-1].finish_reason is None:
            outs += next_event(events, Outputs)[1].outputs
        assert [o.finish_reason for o in outs] == [None, "length"]
        clock.now += 20  # quick-0's deadline passes after it finished
        core.send(Add("after-0", [1], SamplingParams(max_tokens=1), clock.now))
        # the loop expires due requests before every step: a deadline kept for quick-0 would expire before this one
        while True:
            _, event = events.get(timeout=BOUND)
            assert not isinstance(event, Expired), event
            if isinstance(event, Outputs) and any(o.request_id == "after-0" for o in event.outputs):
                break
    assert engine.aborted == ["late-0"]


def test_deadlines_pop_in_order_skip_discarded_ones_and_say_how_long_to_wait() -> None:
    d = Deadlines()
    assert d.wait(0.0) is None and d.pop_due(100.0) == [] and not d
    d.add("b", 20.0)
    d.add("a", 10.0)
    d.add("c", 30.0)
    d.discard("a")
    assert len(d) == 2 and d.wait(5.0) == 15.0 and d.wait(25.0) == 0.0
    assert d.pop_due(19.0) == [] and d.pop_due(25.0) == ["b"] and d.pop_due(1e9) == ["c"]
    for i in range(500):  # finished requests do not pile up in the heap
        d.add(f"r{i}", float(i))
        d.discard(f"r{i}")
    assert len(d._heap) < 200 and d.wait(0.0) is None


# ---- the async side: the engine's "expired" event, and the backstop for a stuck engine ----------------------------
class StuckEngine(FakeEngine):
    """Its first step blocks until `release` is set: an engine stuck in a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def step(self) -> list[RequestOutput]:
        self.release.wait(BOUND)
        return super().step()


def run_async(engine: FakeEngine, body: Any) -> Any:
    async def main() -> Any:
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            return await body(async_engine)
        finally:
            if isinstance(engine, StuckEngine):
                engine.release.set()
            async_engine.stop(BOUND)
    return asyncio.run(main())


class Unfinishable(FakeEngine):
    """Busy forever: every step emits nothing (the requests never finish on their own)."""

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        return []


def test_the_engine_ends_a_request_at_its_deadline_without_the_async_backstop(monkeypatch) -> None:
    monkeypatch.setattr("server.async_engine.DEADLINE_BACKSTOP_S", 3600.0)  # only the engine can end it here
    engine = Unfinishable()

    async def body(async_engine: AsyncEngine) -> list[RequestOutput]:
        gen = async_engine.generate("d", [([1], SamplingParams(max_tokens=3))] * 2, timeout=0.05)
        outs = await asyncio.wait_for(drain(gen), BOUND)
        assert async_engine.num_inflight == 0
        return outs

    outs = run_async(engine, body)
    assert [o.finish_reason for o in outs] == ["abort", "abort"]
    assert sorted(engine.aborted) == ["d-0", "d-1"]  # by the engine loop; no Abort came back from the async side


def test_the_async_backstop_ends_a_request_when_the_engine_is_stuck(monkeypatch) -> None:
    monkeypatch.setattr("server.async_engine.DEADLINE_BACKSTOP_S", 0.1)
    engine = StuckEngine()

    async def body(async_engine: AsyncEngine) -> tuple[list[RequestOutput], float]:
        t0 = time.monotonic()
        gen = async_engine.generate("s", [([1], SamplingParams(max_tokens=3))], timeout=0.05)
        outs = await asyncio.wait_for(drain(gen), BOUND)
        return outs, time.monotonic() - t0

    outs, took = run_async(engine, body)
    assert [o.finish_reason for o in outs] == ["abort"] and took >= 0.15
    assert engine.aborted == ["s-0"]  # the backstop's Abort, applied once the engine came unstuck


# ---- live servers: a client that opens a stream and never reads it ------------------------------------------------
class StalledBody:
    """ASGI wrapper: a generation response's headers go out, then its body sends block until cancelled, as
    uvicorn's send blocks on the transport of a client that reads nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def stalled(message: Message) -> None:
            if message["type"] == "http.response.body":
                await asyncio.Event().wait()
            await send(message)

        await self.app(scope, receive, stalled)


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return make_engine(ckpt, num_kv_tokens=4096)


def open_stream(url: str, body: dict) -> socket.socket:
    """POST a streaming request on a raw socket that the test then never reads."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=BOUND)
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


def wait_for(check: Any, what: str) -> None:
    stop = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < stop, what
        time.sleep(0.02)


def idle(url: str) -> bool:
    return metric(url, "trimode:num_requests_running") == 0 and metric(url, "trimode:kv_cache_usage_perc") == 0


@pytest.mark.parametrize("where", ["field", "config"])
def test_a_stream_nobody_reads_is_aborted_by_the_engine_at_its_deadline(engine, where: str) -> None:
    cfg = ServerConfig(request_timeout=0.3) if where == "config" else ServerConfig()
    body = {**NEVER_READ, "timeout": 0.3} if where == "field" else NEVER_READ
    with live_server(StalledBody(create_app(engine, cfg))) as url, StepGate(engine) as gate:
        aborts = metric(url, "trimode:request_success_total", mode="ar", finished_reason="abort")
        tokens = metric(url, "trimode:generation_tokens_total", mode="ar")
        sock = open_stream(url, body)
        try:
            assert gate.wait_blocked(BOUND)  # the request is in the engine, its first step held
            held = time.monotonic()  # the deadline (admission + 0.3 s) is before held + 0.3 s
            while time.monotonic() <= held + 0.3:
                time.sleep(0.05)
            gate.open()
            wait_for(lambda: metric(url, "trimode:request_success_total", mode="ar", finished_reason="abort")
                     == aborts + 1, "the engine did not abort the request at its deadline")
            wait_for(lambda: idle(url), "the aborted request's KV was not freed")
            assert gate.steps_started == 1  # expired before the step after the deadline
            assert 0 < metric(url, "trimode:generation_tokens_total", mode="ar") - tokens < 400
        finally:
            sock.close()


def test_a_stream_whose_client_stops_reading_is_aborted_after_write_timeout(engine) -> None:
    with live_server(StalledBody(create_app(engine, ServerConfig(write_timeout=0.2)))) as url, \
            StepGate(engine) as gate:
        aborts = metric(url, "trimode:request_success_total", mode="ar", finished_reason="abort")
        gone = metric(url, "trimode:http_requests_client_disconnected_total")
        tokens = metric(url, "trimode:generation_tokens_total", mode="ar")
        sock = open_stream(url, NEVER_READ)  # no deadline: only the write timeout can end it
        try:
            assert gate.wait_blocked(BOUND)
            gate.allow(1)  # the first token: the response starts, its first body send stalls
            wait_for(lambda: metric(url, "trimode:http_requests_client_disconnected_total") == gone + 1,
                     "the stalled stream was not ended after write_timeout")
            assert metric(url, "trimode:request_success_total", mode="ar", finished_reason="abort") == aborts + 1
            gate.open()  # the engine applies the Abort before its next step
            wait_for(lambda: idle(url), "the request's KV was not freed")
            assert gate.steps_started <= 2
            assert 0 < metric(url, "trimode:generation_tokens_total", mode="ar") - tokens < 400
        finally:
            sock.close()
