"""AsyncEngine: the synchronous Engine in one long-lived thread, and the asyncio side that talks to it.

Inbox: a `queue.SimpleQueue` of Add | Abort | Probe | Stop, drained before every step; the thread blocks on it only
when the engine is idle. Outbox: once per step the thread hands that step's outputs to the event loop with a
single `call_soon_threadsafe`; `_dispatch` fans them out to per-request asyncio queues, so a slow client never
blocks the engine. Admission (sequences and tokens in flight) is decided synchronously on the event loop before
any response starts, so the slot is reserved atomically. An exception in the thread kills the engine: every
open request gets `EngineDeadError` and `dead` stays set, unless the exception names the failed requests in a
`request_ids` attribute: then only those fail and the engine goes on. Only this module touches the Engine.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from engine.sequence import RequestOutput, SamplingParams, StepStats
from server.metrics import ServerMetrics

log = logging.getLogger("trimode.server")


class EngineDeadError(RuntimeError):
    """The engine thread died; nothing more will be served."""


class RequestFailedError(RuntimeError):
    """The engine failed this request's batch (an exception carrying `request_ids`); the engine lives on."""


class Overloaded(Exception):
    """Admission refused; `reason` is the requests_rejected_total label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


@dataclass(slots=True)
class Abort:
    request_id: str


@dataclass(slots=True)
class Probe:
    future: asyncio.Future


@dataclass(slots=True)
class Stop:
    pass


Command = Add | Abort | Probe | Stop


@dataclass(slots=True)
class SeqTrack:
    """Async-side bookkeeping of one engine sequence (one choice)."""

    request_id: str
    mode: str
    num_prompt_tokens: int
    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    num_forwards: int = 0
    num_decode_forwards: int = 0


@dataclass(slots=True)
class Snapshot:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


class Generation:
    """One API request's sequences (n choices x prompts). `next()` yields (index, RequestOutput) as they come."""

    def __init__(self, owner: AsyncEngine, request_id: str, tracks: list[SeqTrack], num_tokens: int,
                 deadline: float | None) -> None:
        self.owner = owner
        self.request_id = request_id
        self.tracks = tracks
        self.num_tokens = num_tokens
        self.deadline = deadline
        self.queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        self.start = time.monotonic()
        self.released = False
        self._stash: tuple[int, BaseException] | None = None  # an error met by ready(), raised by next()

    @property
    def done(self) -> bool:
        return all(t.finish_reason is not None for t in self.tracks)

    async def next(self) -> tuple[int, RequestOutput]:
        """The next output of any choice; raises EngineDeadError, or the error an Add met in the engine."""
        if self._stash is not None:
            exc, self._stash = self._stash[1], None
            self.abort_unfinished(push=False)
            raise exc
        while True:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            try:
                index, item = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                self.abort_unfinished()  # deadline: every open choice ends with finish_reason "abort"
                self.deadline = None
                continue
            if isinstance(item, BaseException):
                self.abort_unfinished(push=False)
                raise item
            return index, item

    def ready(self) -> list[tuple[int, RequestOutput]]:
        """Outputs already queued, without waiting: a stream that fell behind the engine sends them as one chunk
        per choice instead of one per step. Stops at an error, which the next `next()` raises."""
        out: list[tuple[int, RequestOutput]] = []
        while self._stash is None and not self.queue.empty():
            index, item = self.queue.get_nowait()
            if isinstance(item, BaseException):
                self._stash = (index, item)
            else:
                out.append((index, item))
        return out

    def finish(self, index: int, reason: str = "stop") -> None:
        """End one choice from the server side (a stop string matched): abort it in the engine."""
        track = self.tracks[index]
        if track.finish_reason is None:
            self.owner._send(Abort(track.request_id))
            self.owner._finish_track(self, track, reason)

    def abort_unfinished(self, push: bool = True) -> None:
        """Abort every open choice; with `push`, each gets a final output with finish_reason "abort"."""
        for index, track in enumerate(self.tracks):
            if track.finish_reason is None:
                self.owner._send(Abort(track.request_id))
                self.owner._finish_track(self, track, "abort")
                if push:
                    self.queue.put_nowait((index, RequestOutput(
                        track.request_id, [], "abort", None, track.num_prompt_tokens, track.num_output_tokens,
                        track.num_forwards, track.num_decode_forwards, track.mode)))

    def close(self) -> None:
        """Release everything (idempotent): called when the handler ends, normally or cancelled."""
        self.abort_unfinished(push=False)


@dataclass
class AsyncEngine:
    """Owns the Engine and its thread; all other server code goes through this object."""

    engine: Any
    served_model_name: str | None = None
    max_queued_requests: int = 256
    max_queued_tokens: int = 1 << 20
    dead: BaseException | None = None
    draining: bool = False
    snapshot: Snapshot = field(default_factory=Snapshot)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.served_model_name or self.engine.model_name)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tracks: dict[str, tuple[Generation, int]] = {}
        self._generations: set[Generation] = set()
        self._queued_seqs = 0
        self._queued_tokens = 0

    # ---- read-only facts (safe from the event loop: no engine state is mutated) ----------------------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def resolve_params(self, params: SamplingParams) -> SamplingParams:
        return self.engine.resolve_params(params)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_request(prompt_token_ids, params)

    @property
    def num_inflight(self) -> int:
        return len(self._generations)

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="trimode-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(Stop())
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- requests -------------------------------------------------------------------------------------------
    def generate(self, request_id: str, prompts: list[tuple[list[int], SamplingParams]],
                 timeout: float | None = None) -> Generation:
        """Admit a request (all or nothing) and queue its sequences; raises Overloaded or EngineDeadError.

        Runs synchronously on the event loop, so the check and the reservation cannot interleave with another
        request's."""
        if self.dead is not None:
            raise EngineDeadError("the engine is dead")
        if self.draining:
            raise Overloaded("draining", "The server is shutting down.")
        num_tokens = sum(len(ids) + params.max_tokens for ids, params in prompts)
        if self._queued_seqs + len(prompts) > self.max_queued_requests:
            raise Overloaded("queue_full", "The server is overloaded: too many requests queued; retry later.")
        if self._queued_tokens + num_tokens > self.max_queued_tokens:
            raise Overloaded("queue_tokens", "The server is overloaded: too many tokens queued; retry later.")
        now = time.monotonic()
        tracks = [SeqTrack(f"{request_id}-{i}", params.mode or "ar", len(ids), now)
                  for i, (ids, params) in enumerate(prompts)]
        gen = Generation(self, request_id, tracks, num_tokens, None if timeout is None else now + timeout)
        self._queued_seqs += len(prompts)
        self._queued_tokens += num_tokens
        self._generations.add(gen)
        for index, (track, (ids, params)) in enumerate(zip(tracks, prompts, strict=True)):
            self._tracks[track.request_id] = (gen, index)
            self.metrics.prompt_tokens.labels(self.metrics.model_name, track.mode).inc(len(ids))
            self._send(Add(track.request_id, ids, params, now))
        return gen

    async def probe(self, timeout: float) -> None:
        """A real one-token forward on the engine thread (readiness); raises on failure or timeout."""
        if self.dead is not None:
            raise EngineDeadError("the engine is dead")
        assert self._loop is not None
        fut = self._loop.create_future()
        self._send(Probe(fut))
        await asyncio.wait_for(fut, timeout)

    def abort_all(self) -> None:
        """End every in-flight request with finish_reason "abort" (drain deadline)."""
        for gen in list(self._generations):
            gen.abort_unfinished()

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let in-flight requests finish for up to `timeout` seconds, then abort the rest."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._generations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._generations:
            log.warning("drain timeout: aborting %d request(s)", len(self._generations))
            self.abort_all()
            while self._generations and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.05)

    # ---- event-loop side ------------------------------------------------------------------------------------
    def _send(self, cmd: Command) -> None:
        self._inbox.put(cmd)

    def _finish_track(self, gen: Generation, track: SeqTrack, reason: str) -> None:
        now = time.monotonic()
        track.finish_reason = reason
        self._tracks.pop(track.request_id, None)
        name = self.metrics.model_name
        self.metrics.request_success.labels(name, track.mode, reason).inc()
        self.metrics.e2e.labels(name, track.mode).observe(now - track.arrival)
        if gen.done and not gen.released:
            gen.released = True
            self._generations.discard(gen)
            self._queued_seqs -= len(gen.tracks)
            self._queued_tokens -= gen.num_tokens
            first = [t.first_token for t in gen.tracks if t.first_token is not None]
            log.info(
                "request_finished id=%s mode=%s n=%d prompt_tokens=%d output_tokens=%d forwards=%d "
                "decode_forwards=%d finish_reasons=%s ttft_s=%s latency_s=%.4f",
                gen.request_id, gen.tracks[0].mode, len(gen.tracks),
                sum(t.num_prompt_tokens for t in gen.tracks), sum(t.num_output_tokens for t in gen.tracks),
                sum(t.num_forwards for t in gen.tracks), sum(t.num_decode_forwards for t in gen.tracks),
                ",".join(str(t.finish_reason) for t in gen.tracks),
                f"{min(first) - gen.start:.4f}" if first else "none", now - gen.start)

    def _dispatch(self, outputs: list[RequestOutput], stats: StepStats | None, step_time: float,
                  snapshot: Snapshot) -> None:
        """Runs on the event loop once per engine step."""
        self.snapshot = snapshot
        if stats is not None:
            self.metrics.on_step(stats)
        now = time.monotonic()
        name = self.metrics.model_name
        for out in outputs:
            entry = self._tracks.get(out.request_id)
            if entry is None:
                continue  # already finished on this side (stop string, abort, deadline)
            gen, index = entry
            track = gen.tracks[index]
            track.num_output_tokens = out.num_output_tokens
            track.num_forwards, track.num_decode_forwards = out.num_forwards, out.num_decode_forwards
            if out.new_token_ids:
                self.metrics.generation_tokens.labels(name, out.mode).inc(len(out.new_token_ids))
                if track.first_token is None:
                    track.first_token = now
                    self.metrics.ttft.labels(name, out.mode).observe(now - track.arrival)
                    self.metrics.queue_time.labels(name, out.mode).observe(
                        max(0.0, now - step_time - track.arrival))
                else:
                    assert track.last_token is not None
                    self.metrics.itl.labels(name, out.mode).observe(now - track.last_token)
                track.last_token = now
            gen.queue.put_nowait((index, out))
            if out.finish_reason is not None:
                self._finish_track(gen, track, out.finish_reason)

    def _fail_request(self, request_id: str, exc: BaseException) -> None:
        entry = self._tracks.get(request_id)
        if entry is not None:
            entry[0].queue.put_nowait((entry[1], exc))

    def _fail_requests(self, request_ids: list[str], exc: BaseException, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        for request_id in request_ids:
            self._fail_request(request_id, RequestFailedError(f"the forward pass failed: {exc}"))

    def _fail_all(self, exc: BaseException) -> None:
        self.dead = exc
        err = EngineDeadError(f"the engine died: {type(exc).__name__}")
        for gen in list(self._generations):
            gen.queue.put_nowait((-1, err))

    def _post(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    # ---- engine thread --------------------------------------------------------------------------------------
    def _apply(self, cmd: Command) -> bool:
        """Apply one inbox command on the engine thread; False means stop."""
        eng = self.engine
        if isinstance(cmd, Add):
            try:
                eng.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params, arrival_time=cmd.arrival_time)
            except ValueError as exc:
                self._post(self._fail_request, cmd.request_id, exc)
        elif isinstance(cmd, Abort):
            eng.abort_request(cmd.request_id)
        elif isinstance(cmd, Probe):
            try:
                eng.probe()
                self._post(_resolve, cmd.future, None)
            except Exception as exc:  # a broken forward fails readiness, not the engine
                self._post(_resolve, cmd.future, exc)
        elif isinstance(cmd, Stop):
            return False
        return True

    def _snap(self) -> Snapshot:
        eng = self.engine
        return Snapshot(eng.num_running, eng.num_waiting, float(eng.kv_cache_usage))

    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                if not eng.has_unfinished():
                    self._post(self._dispatch, [], None, 0.0, self._snap())
                    if not self._apply(self._inbox.get()):
                        return
                while True:
                    try:
                        cmd = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._apply(cmd):
                        return
                if eng.has_unfinished():
                    t0 = time.monotonic()
                    try:
                        outputs = eng.step()
                    except Exception as exc:
                        # engine.engine.BatchError, matched by attribute: importing it would import torch
                        failed = getattr(exc, "request_ids", None)
                        if failed is None:
                            raise
                        # NOTE: a batch-scoped failure: only those requests fail (their blocks are freed)
                        log.error("forward failed for %d request(s): %s", len(failed), exc)
                        for request_id in failed:
                            eng.abort_request(request_id)
                        self._post(self._fail_requests, list(failed), exc, self._snap())
                        continue
                    stats = copy.deepcopy(eng.last_stats)
                    self._post(self._dispatch, outputs, stats, time.monotonic() - t0, self._snap())
        except Exception as exc:
            log.exception("engine thread died")
            self._post(self._fail_all, exc)


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
