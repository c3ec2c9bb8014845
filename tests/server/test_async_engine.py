"""AsyncEngine against a FakeEngine (no model): one outbox hop per step, admission, abort, deadlines, death."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.sequence import RequestOutput, SamplingParams, StepStats
from server.async_engine import AsyncEngine, EngineDeadError, Overloaded
from tests.server.helpers import drain


class FakeEngine:
    """The Engine interface the server uses; every running request emits token 7 per step until max_tokens."""

    tokenizer = None
    model_name = "fake"
    max_model_len = 64

    def __init__(self, stall: bool = False) -> None:
        self.running: dict[str, list] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.step_sizes: list[int] = []  # outputs per step
        self.stall = stall  # never emit (requests stay queued)
        self.last_stats = StepStats()
        self.thread_ids: set[int] = set()

    def admit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        self.running[request_id] = [len(prompt_token_ids), params, 0]

    def abort_request(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        self.last_stats = StepStats(forward_kind="ar_decode", batch_size=len(self.running),
                                    decode_forwards_by_mode={"ar": len(self.running)})
        if self.stall:
            return []
        outs = []
        for rid, entry in list(self.running.items()):
            entry[2] += 1
            done = entry[2] >= entry[1].max_tokens
            outs.append(RequestOutput(rid, [7], "length" if done else None, None, entry[0], entry[2], entry[2],
                                      entry[2], "ar"))
            if done:
                del self.running[rid]
        self.step_sizes.append(len(outs))
        return outs

    num_waiting = 0
    kv_cache_usage = 0.0

    @property
    def num_running(self) -> int:
        return len(self.running)

    def probe(self) -> None:
        self.thread_ids.add(threading.get_ident())


def run(coro_fn, engine: FakeEngine, **kw):
    async def main():
        async_engine = AsyncEngine(engine, **kw)
        async_engine.start()
        try:
            return await coro_fn(async_engine)
        finally:
            async_engine.stop()
    return asyncio.run(main())


def test_outputs_come_back_once_per_step_on_the_engine_thread() -> None:
    engine = FakeEngine()
    hops: list[int] = []

    async def body(async_engine: AsyncEngine) -> list[RequestOutput]:
        original = async_engine._dispatch

        def counting(event):
            if event.stats is not None:
                hops.append(len(event.outputs))
            original(event)

        async_engine._dispatch = counting
        gen = async_engine.generate("r", [([1, 2], SamplingParams(max_tokens=5))] * 3)
        outs = await drain(gen)
        await async_engine.probe(5)
        return outs

    outs = run(body, engine)
    assert len(outs) == 15 and outs[-1].finish_reason == "length"
    # one hop per step, carrying all of that step's outputs (the first step may run before all three Adds arrive,
    # so how the 15 outputs split over steps is the engine thread's timing, not part of the contract)
    assert len(hops) == engine.steps and hops == engine.step_sizes and sum(hops) == 15
    assert len(engine.thread_ids) == 1 and threading.get_ident() not in engine.thread_ids


def test_admission_is_all_or_nothing_and_released_on_finish_or_close() -> None:
    engine = FakeEngine()

    async def body(async_engine: AsyncEngine) -> None:
        a = async_engine.generate("a", [([1], SamplingParams(max_tokens=3))] * 2)
        with pytest.raises(Overloaded) as info:
            async_engine.generate("b", [([1], SamplingParams(max_tokens=3))])
        assert info.value.reason == "queue_full"
        await drain(a)
        b = async_engine.generate("b", [([1], SamplingParams(max_tokens=50))])
        with pytest.raises(Overloaded) as info:
            async_engine.generate("c", [([1], SamplingParams(max_tokens=50))])
        assert info.value.reason == "queue_tokens"
        b.close()
        assert async_engine.num_inflight == 0
        async_engine.generate("c", [([1], SamplingParams(max_tokens=50))]).close()
        await asyncio.sleep(0.05)

    run(body, engine, max_queued_requests=2, max_queued_tokens=60)
    assert "b-0" in engine.aborted and "c-0" in engine.aborted and not engine.running


def test_a_deadline_ends_open_choices_with_abort() -> None:
    engine = FakeEngine(stall=True)

    async def body(async_engine: AsyncEngine) -> list[RequestOutput]:
        return await drain(async_engine.generate("d", [([1], SamplingParams(max_tokens=3))] * 2, timeout=0.05))

    outs = run(body, engine)
    assert [o.finish_reason for o in outs] == ["abort", "abort"]
    assert sorted(engine.aborted) == ["d-0", "d-1"]


def test_a_dead_engine_fails_open_requests_and_refuses_new_ones() -> None:
    engine = FakeEngine()

    def boom() -> list:
        raise RuntimeError("dead")

    async def body(async_engine: AsyncEngine) -> None:
        engine.step = boom
        gen = async_engine.generate("x", [([1], SamplingParams(max_tokens=3))])
        with pytest.raises(EngineDeadError):
            await gen.next()
        assert async_engine.dead is not None and async_engine.num_inflight == 0
        with pytest.raises(EngineDeadError):
            async_engine.generate("y", [([1], SamplingParams(max_tokens=3))])
        with pytest.raises(EngineDeadError):
            await async_engine.probe(1)

    run(body, engine)
