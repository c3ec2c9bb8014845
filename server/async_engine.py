"""AsyncEngine: the asyncio side of the engine. Admission, per-request queues, metrics, deadlines, death.

The engine itself runs behind a `server.transport.EngineTransport`: in a thread of this process
(`ThreadTransport`, given an `Engine`) or in its own process (`server.engine_process.EngineProcess`). Commands go
out through `EngineTransport.send`; each engine step comes back as one event (`engine.events`), posted onto the
event loop with a single `call_soon_threadsafe`; `_dispatch` fans the outputs out to per-request asyncio queues, so
a slow client never blocks the engine. Requests reach `generate` resolved and checked with the engine's `policy`
(by `server.serving`), once, here in the server process; the engine trusts them. Admission (sequences,
tokens and worst-case KV pages in flight, `server.admission`) is decided synchronously on the event loop before any
response starts, so the slot is reserved atomically. A `BatchFailed` event fails only the requests of one failed
forward.

Death: a `Dead` event (the loop or the process ended) fails every open request with `EngineDeadError`, zeroes the
gauges, and sets `dead` (/health 503). A transport that can respawn (an `EngineProcess`) is respawned with backoff,
up to `engine_restart_attempts` times in a row (the count restarts once a respawned engine completes a forward);
then `dead` clears. A `ThreadTransport` cannot be: an exception that escaped its loop leaves the Engine's state
unknown, and a thread cannot be killed. When no respawn is left the engine is lost: `engine_lost` is set and
`on_engine_lost` is called (`trimode serve` then exits 1, for a supervisor to restart the server); an embedder
without the hook (create_app in-process, the tests) keeps answering 503. Stalls and readiness are judged from
event times (`server.liveness`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.commands import Abort, Add, Command, Probe, ResetPrefixCache
from engine.errors import InvalidParam
from engine.events import AddRefused, BatchFailed, Dead, Event, Expired, Outputs, ProbeDone, Snapshot
from engine.policy import RequestPolicy
from engine.sequence import RequestOutput, SamplingParams
from server import admission
from server.liveness import EngineWatch
from server.metrics import ServerMetrics
from server.transport import EngineTransport, ThreadTransport

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger("trimode.server")

DEADLINE_BACKSTOP_S = 1.0  # seconds past a deadline after which the async side ends a request the engine did not


class EngineDeadError(RuntimeError):
    """The engine (its loop or its process) died; nothing more will be served."""


class RequestFailedError(RuntimeError):
    """The engine failed this request's batch (an exception carrying `request_ids`); the engine lives on."""


class Overloaded(Exception):
    """Admission refused; `reason` is the requests_rejected_total label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    decoded: str | None = None  # auto: iterations by choice, from the engine's last output


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
            # the engine loop owns deadlines (engine.loop: it aborts due requests before every step and
            # sends Expired, whether or not anyone reads); this is only the backstop for an engine that is stuck
            # (a step, or a hung engine process, outliving the deadline by DEADLINE_BACKSTOP_S), so that the client
            # still gets its answer
            timeout = None if self.deadline is None else \
                max(0.0, self.deadline + DEADLINE_BACKSTOP_S - time.monotonic())
            try:
                index, item = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                self.abort_unfinished()  # every open choice ends with finish_reason "abort"
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
        for index in range(len(self.tracks)):
            self._abort(index, push, tell_engine=True)

    def expire(self, index: int) -> None:
        """The engine aborted this choice at the request's deadline: it ends with finish_reason "abort"."""
        self._abort(index, push=True, tell_engine=False)

    def _abort(self, index: int, push: bool, tell_engine: bool) -> None:
        track = self.tracks[index]
        if track.finish_reason is not None:
            return
        if tell_engine:
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
    """Owns the engine's transport; all other server code goes through this object.

    `engine` is an `EngineTransport` (an `EngineProcess`) or an `Engine`, which then runs in a `ThreadTransport`."""

    engine: Engine | EngineTransport
    served_model_name: str | None = None
    max_queued_requests: int = 256
    max_queued_tokens: int = 1 << 20
    max_queued_kv_factor: float = 1.0  # admitted worst-case KV pages, as a multiple of the pool (server.admission)
    engine_restart_attempts: int = 3  # respawns in a row of a dead engine process; then the engine is lost
    engine_restart_backoff: float = 1.0  # seconds before the first respawn, doubling with each one after
    stall_timeout: float | None = 60.0  # /health 503 after this long without an engine event while work is in flight
    ready_cache_seconds: float = 5.0  # a forward this recent answers readiness without a probe
    on_engine_lost: Callable[[], None] | None = None  # called once when no respawn is left
    dead: BaseException | None = None
    draining: bool = False
    engine_lost: bool = False
    snapshot: Snapshot = field(default_factory=Snapshot)

    def __post_init__(self) -> None:
        self.core: EngineTransport = self.engine if isinstance(self.engine, EngineTransport) \
            else ThreadTransport(self.engine)
        self.metrics = ServerMetrics(self.served_model_name or self.core.model_name)
        self._policy: RequestPolicy | None = self.core.policy
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probes: dict[int, asyncio.Future] = {}
        self._probe_ids = itertools.count()
        self._tracks: dict[str, tuple[Generation, int]] = {}
        self._generations: set[Generation] = set()
        self._queued_seqs = 0
        self._queued_tokens = 0
        self._queued_pages = 0
        self._gen_pages: dict[Generation, int] = {}  # KV pages each admitted generation reserved
        self.watch = EngineWatch(self.stall_timeout, self.ready_cache_seconds)
        self._probe_task: asyncio.Future | None = None  # the readiness probe every concurrent caller awaits
        self._recovery: asyncio.Task | None = None
        self._restarts_in_a_row = 0
        self.restarting: str | None = None  # "attempt i of n" while a respawn is under way

    # ---- read-only facts (safe from the event loop: no engine state is mutated) ----------------------------
    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def policy(self) -> RequestPolicy:
        """What a request may ask of the engine, as the engine shipped it: the serving layer resolves and checks
        every request with it once, here in the server process, and the engine trusts what was checked."""
        assert self._policy is not None, "this engine ships no RequestPolicy (a test fake)"
        return self._policy

    @property
    def num_inflight(self) -> int:
        return len(self._generations)

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine loop; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        self.core.start(self._on_event)

    def stop(self, timeout: float = 10.0) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
        self.core.stop(timeout)

    def health_problem(self) -> str | None:
        """Why the engine cannot serve now (/health 503), or None: dead, being respawned, or stalled."""
        if self.dead is not None:
            if self.restarting is not None:
                return f"The engine died and is being restarted ({self.restarting})."
            return "The engine is dead."
        silent = self.watch.stalled_for(bool(self._generations or self._probes))
        if silent is not None:
            return (f"The engine has not stepped for {silent:.0f}s with {len(self._generations)} request(s) in "
                    f"flight (stall_timeout {self.stall_timeout:g}s).")
        return None

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
        policy = self._policy
        pages, bound = 0, 0
        if policy is not None:
            if why := admission.never_fits(policy, self.max_queued_kv_factor, prompts):
                return self._refused(request_id, prompts, why)
            pages, bound = admission.request_pages(policy, prompts), admission.bound_pages(
                policy, self.max_queued_kv_factor)
        if self._queued_seqs + len(prompts) > self.max_queued_requests:
            raise Overloaded("queue_full", "The server is overloaded: too many requests queued; retry later.")
        if self._queued_tokens + num_tokens > self.max_queued_tokens:
            raise Overloaded("queue_tokens", "The server is overloaded: too many tokens queued; retry later.")
        if policy is not None and self._queued_pages + pages > bound:
            raise Overloaded("queue_kv", f"The server is overloaded: the requests in flight may need "
                             f"{self._queued_pages} of the {bound} KV pages it admits, and this one {pages}; "
                             f"retry later.")
        self.watch.work_arrived(bool(self._generations or self._probes))
        now = time.monotonic()
        tracks = [SeqTrack(f"{request_id}-{i}", params.mode or "ar", len(ids), now)
                  for i, (ids, params) in enumerate(prompts)]
        gen = Generation(self, request_id, tracks, num_tokens, None if timeout is None else now + timeout)
        self._queued_seqs += len(prompts)
        self._queued_tokens += num_tokens
        self._queued_pages += pages
        self._gen_pages[gen] = pages
        self._generations.add(gen)
        for index, (track, (ids, params)) in enumerate(zip(tracks, prompts, strict=True)):
            self._tracks[track.request_id] = (gen, index)
            self.metrics.prompt_tokens.labels(self.metrics.model_name, track.mode).inc(len(ids))
            self._send(Add(track.request_id, ids, params, now, gen.deadline))
        return gen

    def _refused(self, request_id: str, prompts: list[tuple[list[int], SamplingParams]],
                 why: InvalidParam) -> Generation:
        """A request that can never be admitted: nothing is reserved or sent, and the first `next()` raises
        `why`, as for an Add the engine refused, which the serving layer answers with a 400."""
        now = time.monotonic()
        tracks = [SeqTrack(f"{request_id}-{i}", params.mode or "ar", len(ids), now, finish_reason="abort")
                  for i, (ids, params) in enumerate(prompts)]
        gen = Generation(self, request_id, tracks, 0, None)
        gen.released = True
        gen.queue.put_nowait((0, why))
        return gen

    async def probe(self, timeout: float) -> None:
        """Readiness: a real one-token forward on the engine; raises on failure or timeout.

        A forward that completed within `ready_cache_seconds` (a step or a probe) answers without a new one, and
        concurrent callers share one probe in flight, so a burst of readiness checks costs at most one forward."""
        if self.dead is not None:
            raise EngineDeadError("the engine is dead")
        if self.watch.ready_cached():
            return
        if self._probe_task is None or self._probe_task.done():
            self.watch.work_arrived(bool(self._generations or self._probes))
            self._probe_task = asyncio.ensure_future(self._probe_once(timeout))
            # retrieved here so that a probe whose callers all went away logs no "never retrieved" error
            self._probe_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(self._probe_task)  # a caller that goes away does not cancel the others' probe

    async def _probe_once(self, timeout: float) -> None:
        assert self._loop is not None
        probe_id = next(self._probe_ids)
        fut = self._probes[probe_id] = self._loop.create_future()
        self._send(Probe(probe_id))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._probes.pop(probe_id, None)

    def reset_prefix_cache(self) -> None:
        """Have the engine forget its cached KV blocks before it serves any request sent after this call (the
        command queue is FIFO); raises EngineDeadError when there is no engine to reset."""
        if self.dead is not None:
            raise EngineDeadError("the engine is dead")
        self._send(ResetPrefixCache())

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
        self.core.send(cmd)

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
            self._queued_pages -= self._gen_pages.pop(gen, 0)
            first = [t.first_token for t in gen.tracks if t.first_token is not None]
            log.info(
                "request_finished id=%s mode=%s decoded=%s n=%d prompt_tokens=%d output_tokens=%d forwards=%d "
                "decode_forwards=%d finish_reasons=%s ttft_s=%s latency_s=%.4f",
                gen.request_id, gen.tracks[0].mode, ";".join(t.decoded or t.mode for t in gen.tracks), len(gen.tracks),
                sum(t.num_prompt_tokens for t in gen.tracks), sum(t.num_output_tokens for t in gen.tracks),
                sum(t.num_forwards for t in gen.tracks), sum(t.num_decode_forwards for t in gen.tracks),
                ",".join(str(t.finish_reason) for t in gen.tracks),
                f"{min(first) - gen.start:.4f}" if first else "none", now - gen.start)

    def _dispatch(self, event: Outputs) -> None:
        """Runs on the event loop once per engine step: each output to its request's queue, and the metrics."""
        self.snapshot = event.snapshot
        if event.stats is not None:
            self.metrics.on_step(event.stats)
        outputs, step_time = event.outputs, event.step_seconds
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
            track.decoded = out.decoded or track.decoded
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

    def _push_error(self, request_id: str, exc: BaseException) -> None:
        entry = self._tracks.get(request_id)
        if entry is not None:
            entry[0].queue.put_nowait((entry[1], exc))

    def _add_refused(self, event: AddRefused) -> None:
        """An Add the engine refused (its ValueError's text, and the field an InvalidParam named): a 400."""
        message, field = event.message, event.field
        self._push_error(event.request_id, ValueError(message) if field is None else InvalidParam(field, message))

    def _batch_failed(self, event: BatchFailed) -> None:
        self.snapshot = event.snapshot
        for request_id in event.request_ids:
            self._push_error(request_id, RequestFailedError(f"the forward pass failed: {event.message}"))

    def _expired(self, event: Expired) -> None:
        """Requests the engine aborted at their deadline (their KV is already free): each ends with "abort"."""
        self.snapshot = event.snapshot
        for request_id in event.request_ids:
            entry = self._tracks.get(request_id)
            if entry is not None:  # else: already ended on this side (a stop string, the client went away)
                entry[0].expire(entry[1])

    def _probe_done(self, event: ProbeDone) -> None:
        fut = self._probes.get(event.probe_id)
        if fut is not None and not fut.done():
            if event.error is None:
                fut.set_result(None)
            else:
                fut.set_exception(RuntimeError(event.error))

    def _fail_all(self, reason: str) -> None:
        if self.dead is not None:
            return  # the loop reported its death, then the process exit is reported too
        err = EngineDeadError(f"the engine died: {reason}")
        self.dead = err
        self.snapshot = Snapshot()  # nothing runs or waits in a dead engine: the gauges read 0, not their last
        self.watch.engine_replaced()
        for gen in list(self._generations):
            gen.queue.put_nowait((-1, err))
            # the engine holds nothing of them any more: their admission is released now, not when their handlers
            # get round to the error, so a respawned engine starts with none of them counted as its work
            for track in gen.tracks:
                if track.finish_reason is None:
                    self._finish_track(gen, track, "abort")
        for fut in self._probes.values():
            if not fut.done():
                fut.set_exception(err)
        self._recovery = asyncio.ensure_future(self._recover(reason))

    async def _recover(self, reason: str) -> None:
        """Respawn the engine with backoff while attempts are left (see the module docstring); else lose it."""
        can_respawn = self.core.can_respawn  # EngineProcess only
        attempts = self.engine_restart_attempts
        while can_respawn and not self.draining and self._restarts_in_a_row < attempts:
            delay = self.engine_restart_backoff * 2 ** min(self._restarts_in_a_row, 8)
            self._restarts_in_a_row += 1
            self.restarting = f"attempt {self._restarts_in_a_row} of {attempts}"
            log.warning("engine died (%s): respawning in %.1fs (%s)", reason, delay, self.restarting)
            await asyncio.sleep(delay)
            if self.draining:
                break
            try:
                await asyncio.to_thread(self.core.respawn)
            except Exception as exc:  # noqa: BLE001 - a failed load is one attempt spent, not the server's end
                log.error("engine respawn failed (%s): %s: %s", self.restarting, type(exc).__name__, exc)
                reason = f"respawn failed: {type(exc).__name__}"
                continue
            self.watch.engine_replaced()
            self._policy = self.core.policy  # the respawned engine's (the same config: the same policy)
            self.core.start(self._on_event)
            self.dead, self.restarting = None, None
            self.metrics.engine_restarts.labels(self.metrics.model_name).inc()
            log.warning("engine respawned; serving again")
            return
        self.restarting = None
        self.engine_lost = True
        log.critical("the engine is lost (%s); %s", reason, "no respawn is possible for an in-process engine"
                     if not can_respawn else f"{self._restarts_in_a_row} respawn(s) in a row used")
        if self.on_engine_lost is not None:
            self.on_engine_lost()

    def _on_event(self, event: Event) -> None:
        """Called by the transport's thread for every event: hop onto the event loop."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._on_loop, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _on_loop(self, event: Event) -> None:
        if self.watch.on_event(event):
            self._restarts_in_a_row = 0  # this engine ran a forward: a later death starts a fresh run of attempts
        if isinstance(event, Outputs):
            self._dispatch(event)
        elif isinstance(event, AddRefused):
            self._add_refused(event)
        elif isinstance(event, BatchFailed):
            self._batch_failed(event)
        elif isinstance(event, Expired):
            self._expired(event)
        elif isinstance(event, ProbeDone):
            self._probe_done(event)
        elif isinstance(event, Dead):
            self._fail_all(event.reason)
        else:
            raise TypeError(f"unknown engine event {event!r}")
