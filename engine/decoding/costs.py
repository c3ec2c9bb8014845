"""What a forward costs, for `auto`: seconds by forward kind and query rows, measured at startup through the real
runner and refined online from the engine's step times.

Model (measured, not assumed): per kind (`ar_decode`, `draft`, `verify`) a piecewise-linear curve of seconds over
the forward's query rows (`Curve`), through the times measured at a few batch sizes and block lengths, extended
past the last point along its last segment. Rows, not sequences, are the variable: on a CPU the GEMMs over the
rows dominate, on a GPU the fixed cost of streaming the weights does until the rows reach the hundreds, and in
both one 16-row block and four 4-row blocks cost about the same. `measure` times the shapes within a budget (a few
seconds): the ones that pin the curves down first (the checkpoint's block length at 1, 4 and 16 sequences, the
smaller block lengths at one sequence, 1 to 64 ar sequences), the rest while the budget lasts.

Online, every step's measured time divided by the prediction updates an engine-wide factor (an EMA: load from
other processes slows every shape alike, and comparisons between plans do not depend on it) and, relative to it,
a slower factor per kind and rows bucket (attention over longer contexts, the sampling that follows each forward
and anything else the runner-only measurement misses, learned where the engine runs; 1 for a shape not seen since
startup). Both are clamped, so one wild step cannot wreck the model. The time between steps that is not a step's
(scheduling, handing the outputs over to the server process) is a per-step cost of its own, added to every
forward: it is what makes a mode that emits more tokens per step cheaper than the forwards alone say.

One forward that carries several kinds (the merged-forward engine) costs each kind's share of the rows at its
curve's price for the forward's total rows. Denoise and commit forwards (diffusion) are priced as draft and verify
forwards of the same shape. A forward whose rows exceed `max_num_batched_tokens` is priced as the several forwards
the scheduler splits it into.
"""

from __future__ import annotations

import bisect
import logging
import statistics
import time

from engine.forward import Forward

log = logging.getLogger("trimode.engine")

MEASURED = (Forward.AR_DECODE, Forward.DRAFT, Forward.VERIFY)
_PRICED_AS = {Forward.DENOISE: Forward.DRAFT, Forward.COMMIT: Forward.VERIFY, Forward.PREFILL: Forward.VERIFY}
_EMA = 0.1  # weight of one step's ratio in the engine-wide factor
_EMA_SHAPE = 0.05  # weight of one step's ratio (relative to the engine-wide factor) in its shape's factor
_CLAMP = (0.2, 5.0)  # a correction factor stays within these (one wild step cannot wreck the model)


def clock_for(device_type: str):
    """The clock steps are timed with: on a CPU the engine thread's CPU time, which other processes' load on a
    shared machine does not inflate (the thread takes part in every intra-op parallel region, so it tracks the
    forward's own wall time); on a GPU wall time (the thread waits for the device)."""
    return time.thread_time if device_type == "cpu" else time.perf_counter


def _monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators): more rows never cost less, and a noisy
    small shape must not make a larger one look cheaper."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out: list[float] = []
    for total, count in blocks:
        out += [total / count] * int(count)
    return out


class Curve:
    """Seconds of one forward by its query rows: piecewise linear through measured points (made non-decreasing),
    flat below the first, along the last segment's slope past the last."""

    def __init__(self, points: list[tuple[float, float]]) -> None:
        if not points:
            raise ValueError("a cost curve needs at least one measured point")
        by_rows: dict[float, list[float]] = {}
        for rows, seconds in points:
            by_rows.setdefault(float(rows), []).append(float(seconds))
        self.rows = sorted(by_rows)
        self.seconds = _monotone([statistics.median(by_rows[r]) for r in self.rows])

    def __call__(self, rows: float) -> float:
        xs, ys = self.rows, self.seconds
        if len(xs) == 1:
            return ys[0] * max(rows, xs[0]) / xs[0]  # one point: proportional beyond it
        if rows <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, rows)
        if i >= len(xs):
            i = len(xs) - 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        slope = (y1 - y0) / (x1 - x0)
        return max(y0 + slope * (rows - x0), 0.0)

    def __repr__(self) -> str:
        return ", ".join(f"{r:g} rows {s * 1e3:.2f} ms" for r, s in zip(self.rows, self.seconds))


def _bucket(rows: float) -> int:
    """Power-of-two bucket of a row count (1, 2, 4, ...)."""
    b = 1
    while b * 2 <= rows:
        b *= 2
    return b


class ForwardCosts:
    """Per-kind cost curves times the online correction; `seconds` prices one (grouped) forward, `merged_seconds`
    one forward carrying several kinds."""

    def __init__(self, curves: dict[Forward, Curve], max_rows: int | None = None) -> None:
        missing = [str(k) for k in MEASURED if k not in curves]
        if missing:
            raise ValueError(f"forward costs: no curve for {', '.join(missing)}")
        self.curves = dict(curves)
        self.max_rows = max_rows
        # measured / measured-at-startup: the whole machine's drift (load from other processes moves every shape
        # alike), times a slower correction per (kind or None for a merged forward, rows bucket) relative to it
        self.engine_factor = 1.0
        self.factor: dict[tuple[Forward | None, int], float] = {}
        # what each step costs besides its forward and decoders (scheduling, handing outputs to the server): paid
        # per step whatever the step carries, so it favours the modes that emit more tokens per step
        self.step_overhead = 0.0

    @staticmethod
    def _kind(kind: Forward) -> Forward:
        return _PRICED_AS.get(kind, kind)

    def _pieces(self, rows: float) -> int:
        return 1 if not self.max_rows or rows <= self.max_rows else -(-int(rows) // self.max_rows)

    def _raw(self, kind: Forward, rows: float) -> float:
        pieces = self._pieces(rows)
        return pieces * self.curves[self._kind(kind)](rows / pieces)

    def _raw_merged(self, parts: dict[Forward, float]) -> float:
        total = sum(parts.values())
        pieces = self._pieces(total)
        return pieces * sum(r / total * self.curves[self._kind(k)](total / pieces) for k, r in parts.items() if r > 0)

    def seconds(self, kind: Forward, rows: float) -> float:
        """Predicted seconds of the forward(s) that carry `rows` query rows of `kind`."""
        if rows <= 0:
            return 0.0
        scaled = self._raw(kind, rows) * self.engine_factor * self.factor.get((self._kind(kind), _bucket(rows)), 1.0)
        return scaled + self._pieces(rows) * self.step_overhead

    def merged_seconds(self, parts: dict[Forward, float]) -> float:
        """Predicted seconds of one forward carrying `parts` (kind -> query rows)."""
        total = sum(parts.values())
        if total <= 0:
            return 0.0
        scaled = self._raw_merged(parts) * self.engine_factor * self.factor.get((None, _bucket(total)), 1.0)
        return scaled + self._pieces(total) * self.step_overhead

    def observe_overhead(self, seconds: float) -> None:
        """One step spent `seconds` outside its forward and decoders (an EMA; the caller leaves out idle gaps)."""
        self.step_overhead = self.step_overhead * (1 - _EMA) + max(seconds, 0.0) * _EMA

    def _learn(self, key: tuple[Forward | None, int], predicted: float, seconds: float) -> None:
        if predicted <= 0 or seconds <= 0:
            return
        ratio = min(max(seconds / predicted, _CLAMP[0]), _CLAMP[1])
        self.engine_factor = self.engine_factor * (1 - _EMA) + ratio * _EMA
        relative = min(max(ratio / self.engine_factor, _CLAMP[0]), _CLAMP[1])
        self.factor[key] = self.factor.get(key, 1.0) * (1 - _EMA_SHAPE) + relative * _EMA_SHAPE

    def observe(self, kind: Forward, rows: int, seconds: float) -> None:
        """A step that ran one forward of `kind` over `rows` query rows took `seconds`."""
        self._learn((self._kind(kind), _bucket(rows)), self._raw(kind, rows), seconds)

    def observe_merged(self, parts: dict[Forward, float], seconds: float) -> None:
        """A step that ran one forward carrying `parts` (kind -> rows) took `seconds`."""
        self._learn((None, _bucket(sum(parts.values()))), self._raw_merged(parts), seconds)

    def describe(self) -> str:
        return "; ".join(f"{k}: {c}" for k, c in self.curves.items())


def _shapes(block_lengths: tuple[int, ...], main: int, max_seqs: int) -> list[tuple[Forward, int, int]]:
    """(kind, sequences, block length) to time, most informative first."""
    ns = [n for n in (1, 4, 16, 64) if n <= max_seqs] or [1]
    smaller = sorted((b for b in block_lengths if b < main), reverse=True)
    larger = sorted(b for b in block_lengths if b > main)
    shapes: list[tuple[Forward, int, int]] = []
    for n in ns[:3]:
        shapes += [(Forward.AR_DECODE, n, 1), (Forward.DRAFT, n, main), (Forward.VERIFY, n, main)]
    for length in smaller:
        shapes += [(Forward.DRAFT, 1, length), (Forward.VERIFY, 1, length)]
    shapes += [(Forward.AR_DECODE, n, 1) for n in ns[3:]]
    for n in ns[3:]:
        shapes += [(Forward.DRAFT, n, main), (Forward.VERIFY, n, main)]
    for length in smaller:
        shapes += [(Forward.DRAFT, 4, length), (Forward.VERIFY, 4, length)]
    for length in larger:
        shapes += [(Forward.DRAFT, 1, length), (Forward.VERIFY, 1, length)]
    seen: set[tuple[Forward, int, int]] = set()
    return [s for s in shapes if not (s in seen or seen.add(s))]


def measure(runner, blocks, draft_lora: bool, mask_id: int, block_lengths: tuple[int, ...], main_block: int,
            max_seqs: int, budget_s: float = 3.0, context: int = 64, repeats: int = 5,
            max_rows: int | None = None, clock=time.perf_counter) -> ForwardCosts:
    """Time `ar_decode`, `draft` and `verify` forwards through `runner` on fake sequences holding `context` cached
    tokens (pages borrowed from `blocks` and given back) and build the cost curves. The first shapes of each kind
    (1, 4, 16 sequences at `main_block`) are always measured, the rest while half of `budget_s` lasts. One
    warm-up pass runs each shape once, then up to `repeats` passes (two at least, more while the budget lasts) run
    every shape once each, in turn, and a shape's time is its fastest by `clock` (noise only ever adds time).
    Passes, not a shape's repeats back to back: what matters is how shapes compare, and a machine whose speed
    drifts during the measurement (a shared one does, by a third within a second) then slows every shape alike
    instead of making the shapes timed in a slow spell look dear."""
    from engine.batch import Batch  # the runner's input; imported here to keep this module's import light
    from engine.forward import BatchKey, ForwardRequest
    from engine.sequence import SamplingParams, Sequence

    token = 5  # any ordinary token id: the timing does not depend on the ids
    merged_batch = "sections" in getattr(Batch, "__dataclass_fields__", {})
    points: dict[Forward, list[tuple[float, float]]] = {k: [] for k in MEASURED}
    start = time.perf_counter()
    shapes = _shapes(block_lengths, main_block, max_seqs)
    # one set of fake sequences serves every shape (a shape runs on the first n, grown to its length as needed):
    # all of them are ready for every pass
    seqs: list[Sequence] = []

    def room(n: int, tokens: int) -> bool:
        """Whether the first n fake sequences hold `tokens` positions each, making and growing them if the pool
        allows."""
        while len(seqs) < n:
            seq = Sequence(f"auto-costs-{len(seqs)}", [token] * context, context, SamplingParams(), frozenset())
            seq.num_computed_tokens = context
            seqs.append(seq)
        if not blocks.can_allocate(sum(blocks.blocks_needed(seq, tokens) for seq in seqs[:n])):
            return False
        for seq in seqs[:n]:
            blocks.allocate(seq, tokens)
        return True

    try:
        timed: list[tuple[Forward, int, object]] = []  # (kind, rows, batch) of the shapes measured
        # the warm-up pass picks the shapes: the first nine, then as many as half the budget allows (it takes
        # longer than a timed pass: the first forwards of a process pay one-time costs)
        for kind, n, length in shapes:
            if len(timed) >= 9 and time.perf_counter() - start > budget_s / 2:
                break
            if not room(n, context + length):
                continue
            ids = [token] if kind == Forward.AR_DECODE else \
                ([token] + [mask_id] * (length - 1) if kind == Forward.DRAFT else [token] * length)
            lora = draft_lora and kind == Forward.DRAFT
            key = BatchKey(kind, draft_lora=lora, block_length=None if kind == Forward.AR_DECODE else length)
            reqs = [ForwardRequest(key, list(ids), all_logits=len(ids) > 1) for _ in range(n)]
            # the merged-forward Batch takes (seqs, requests); the grouped one also named its forward and adapter
            batch = Batch(seqs[:n], reqs) if merged_batch else Batch(kind, lora, seqs[:n], reqs)
            runner.run(batch)
            timed.append((kind, n * len(ids), batch))
        best = [float("inf")] * len(timed)
        for r in range(repeats):  # (two passes at least; more while the budget lasts)
            if r >= 2 and time.perf_counter() - start > budget_s:
                break
            for i, (_, _, batch) in enumerate(timed):
                t = clock()
                runner.run(batch)
                best[i] = min(best[i], clock() - t)
        for (kind, rows, _), seconds in zip(timed, best, strict=True):
            points[kind].append((rows, seconds))
    finally:
        for seq in seqs:
            blocks.free(seq)
    costs = ForwardCosts({k: Curve(v) for k, v in points.items()}, max_rows=max_rows)
    log.info("auto: forward costs measured in %.2f s (%d shapes): %s", time.perf_counter() - start,
             sum(len(v) for v in points.values()), costs.describe())
    return costs
