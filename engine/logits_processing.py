"""Per-sequence logits processing: what a request's sampling controls do to the logits before a token is chosen.

Every point where a decoder chooses a token from logits (the prefill's first token, an `ar` step, a self_spec
draft and verify, a diffusion denoise pick or commit seed, `auto`'s ar steps) passes the rows through
`process(logits, seq, prefixes)` first. Row i's context is the sequence's output tokens so far followed by
`prefixes[i]`, the tokens assumed before that row: for a self_spec verify, row i comes after drafts d_1 .. d_i; for
a draft or a denoise row, the tentative tokens committed to its left in the block; for `ar`, the prefill and a
commit seed, nothing. So a control applies to each verify row given the drafts accepted before it, which keeps
greedy self_spec equal to greedy ar under it.

A sequence whose request sets no control has no pipeline (`seq.logits_pipeline is None`) and `process` returns
the rows untouched: plain requests pay nothing. Processors run in vLLM's order (allowed tokens, bad words,
min_tokens, logit_bias, then the penalties); temperature, min_p, top-k and top-p stay in `engine.sampling`.
Logprobs are reported from the raw rows (vLLM's default), never from processed ones.

A processor is any callable `(logits [N, V] fp32, seq, prefixes) -> logits`; it may modify its input in place
(the pipeline hands it a private copy). One that can ban every token of a row (the default assumption; attribute
`can_empty = False` says it cannot) makes the pipeline check for rows left empty: those fall back to the model's
row, logged once per request, rather than sample from NaN. `build_pipeline` makes the list from a request's
SamplingParams; other constraints (e.g. a grammar) append theirs to `LogitsPipeline.processors`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.sampling import exclude, greedy, sample
from engine.sequence import SamplingParams, Sequence

NEG_INF = float("-inf")
log = logging.getLogger("trimode.engine")


class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
        """Rows [N, V] fp32 (a private copy: in-place edits are fine) -> processed rows."""


class MaskProcessor(LogitsProcessor, Protocol):
    """A processor that only makes tokens impossible (never moves a finite logit) and can say, for one token, whether
    it would (a grammar). A greedy choice asks it about the token the other controls pick instead of building its
    mask: when that token survives, it is the masked row's argmax too (`greedy_chain`)."""

    def allows(self, seq: Sequence, prefix: Seq[int], token: int) -> bool:
        """Whether the row after `prefix` keeps `token` finite."""

    def best(self, seq: Sequence, prefix: Seq[int], row: torch.Tensor) -> int | None:
        """The argmax of `row` [V] under the mask of the row after `prefix`; None when that row is unmasked or the
        mask leaves nothing (the full pipeline decides those)."""


@dataclass
class LogitsPipeline:
    """A sequence's processors, applied in order."""

    processors: list[LogitsProcessor] = field(default_factory=list)
    mask_id: int | None = None  # never chosen: a row whose only finite logit is the mask's is empty
    warned: bool = False

    @property
    def ordered(self) -> bool:
        """Whether a processor needs every row's exact left context (its attribute `needs_order`): then diffusion
        commits a block left to right, each position after the tokens to its left."""
        return any(getattr(p, "needs_order", False) for p in self.processors)

    def apply(self, logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
        assert len(prefixes) == logits.shape[0], "one prefix per row"
        out = logits.float().clone()
        for proc in self.processors:
            out = proc(out, seq, prefixes)
        if not any(getattr(p, "can_empty", True) for p in self.processors):
            return out
        # a row is empty when its best logit, the mask's aside, is -inf (max: isfinite().any() cost 5x more)
        saved = None
        if self.mask_id is not None:
            saved = out[:, self.mask_id].clone()
            out[:, self.mask_id] = NEG_INF
        empty = out.max(-1).values == NEG_INF
        if saved is not None:
            out[:, self.mask_id] = saved
        if bool(empty.any()):
            # the controls together leave nothing possible (e.g. allowed_token_ids that a bad word or min_tokens
            # bans): those rows fall back to the model's own, and the log says so once per request
            out[empty] = logits[empty].float()
            if not self.warned:
                self.warned = True
                log.warning("request %s: its sampling controls leave no token possible; such rows are unconstrained",
                            seq.request_id)
        return out


def process(logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]] | None = None) -> torch.Tensor:
    """`logits` [N, V] after `seq`'s controls; `prefixes=None` means every row follows the output so far. The rows
    themselves (not a copy) when the sequence has no pipeline."""
    pipe: LogitsPipeline | None = seq.logits_pipeline
    if pipe is None or not pipe.processors:
        return logits
    return pipe.apply(logits, seq, [()] * logits.shape[0] if prefixes is None else prefixes)


def choose_next(rows: torch.Tensor, seq: Sequence, mask_id: int | None, after: Seq[int] = ()) -> list[int]:
    """The token after the output so far and `after` from its row [1, V]: `sample(process(rows, seq, [after]),
    ...)`, a greedy choice through `greedy_chain` (no mask built where the model's pick is allowed)."""
    if seq.params.temperature == 0:
        return greedy_chain(rows, seq, mask_id, after=after)
    return sample(process(rows, seq, [tuple(after)]), seq.params, seq.generator, mask_id)


CANDIDATES = 2  # a row's best tokens a mask processor is asked about before its mask is built (measured:
# under a JSON schema the built-in model's first or second token is kept in 69 % of draft rows, its first eight in 73 %)


def greedy_chain(logits: torch.Tensor, seq: Sequence, mask_id: int | None,
                 follow: Seq[int] | None = None, after: Seq[int] = ()) -> list[int]:
    """Greedy tokens of rows that follow one another, each after the tokens of the rows before it: its own picks
    (a draft, `follow=None`), or `follow[:i]` (a verify row i after drafts d_1 .. d_i; the walk stops after the
    first pick that differs from `follow`, or after row len(follow)); all of them after `after`. Equal, row for row, to
    `greedy(exclude(process(logits, seq, prefixes), mask_id))` with those prefixes, but the mask processors (a
    grammar) are asked about the row's best tokens in order instead of building their masks: the first one they all
    keep is the masked row's argmax. Only a row where they refuse every candidate builds the masks.
    """
    pipe: LogitsPipeline | None = seq.logits_pipeline
    masks: list[MaskProcessor] = [p for p in pipe.processors if hasattr(p, "allows")] if pipe else []  # type: ignore[misc]
    others = [p for p in pipe.processors if not hasattr(p, "allows")] if pipe is not None else []
    base = tuple(after)
    n = logits.shape[0] if follow is None else min(logits.shape[0], len(follow) + 1)
    width = min(CANDIDATES + 1, logits.shape[-1])  # one more: the bound on the tokens left out
    rows: torch.Tensor | None = None
    if not others or follow is not None:  # every row's prefix is known: the other controls run in one call
        rows = _run(others, logits[:n].float().clone() if others else logits[:n].float(), seq,
                    [base + tuple(follow[:i]) for i in range(n)] if follow is not None else [base] * n)
        rows = exclude(rows, mask_id)
        if not masks:  # plain greedy rows
            top = greedy(rows).tolist()
            c = 0
            while follow is not None and c < len(follow) and top[c] == follow[c]:
                c += 1
            return top if follow is None else top[:c + 1]
        best = rows.topk(width, dim=-1)
        ranked = best.values.tolist(), best.indices.tolist()
    picks: list[int] = []
    for i in range(n):
        prefix = base + (tuple(follow[:i]) if follow is not None else tuple(picks))
        t = None
        if masks:
            if rows is None:
                row = exclude(_run(others, logits[i:i + 1].float().clone(), seq, [prefix]), mask_id)[0]
                best = row.topk(width)
                values, ids = best.values.tolist(), best.indices.tolist()
            else:
                row, values, ids = rows[i], ranked[0][i], ranked[1][i]
            t = _first_kept(values, ids, masks, seq, prefix, logits.shape[-1])
            if t is None and len(masks) == 1:  # its candidates refused: its mask over this row
                t = masks[0].best(seq, prefix, row)
        if t is None:  # no mask, or a row the controls or a mask empty: the full pipeline on this row
            t = int(greedy(exclude(process(logits[i:i + 1], seq, [prefix]), mask_id)))
        picks.append(t)
        if follow is not None and (i == len(follow) or t != follow[i]):
            break
    return picks


def _first_kept(values: list[float], ids: list[int], masks: list[MaskProcessor], seq: Sequence,
                prefix: tuple[int, ...], vocab: int) -> int | None:
    """The first of a row's best tokens (value descending, then id ascending: argmax's order on ties) that every
    mask keeps; None when none does or that would not make it the masked row's argmax. The last of `values` (one
    more than the candidates, unless they are the whole vocabulary) bounds the tokens left out: a candidate that
    does not beat it strictly may tie with one of them that comes first."""
    bound = values[-1] if len(ids) < vocab else NEG_INF
    for v, t in sorted(zip(values, ids), key=lambda c: (-c[0], c[1])):
        if v == NEG_INF or (v <= bound and len(ids) < vocab):
            return None  # an empty row, or no candidate left that is sure to come first
        if all(m.allows(seq, prefix, t) for m in masks):
            return t
    return None


def _run(procs: Seq[LogitsProcessor], rows: torch.Tensor, seq: Sequence,
         prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
    for proc in procs:
        rows = proc(rows, seq, prefixes)
    return rows


def committed_prefixes(block: Seq[int], positions: Seq[int], mask_id: int | None, start: int = 1) -> list[tuple]:
    """For rows at `positions` of a block being filled (tentative tokens from index `start`, masks elsewhere): the
    run of committed tokens from `start` up to the row or the first mask, whichever comes first. Exact for the
    leftmost undecided position; a shorter, still committed context for the others."""
    out = []
    for pos in positions:
        end = start
        while end < pos and block[end] != mask_id:
            end += 1
        out.append(tuple(block[start:end]))
    return out


# ---- the sampling controls ------------------------------------------------------------------------------------
def _context(seq: Sequence, prefix: tuple[int, ...]) -> list[int]:
    return seq.token_ids[seq.num_prompt_tokens:] + list(prefix)


class AllowedTokens:
    """`allowed_token_ids`: every other token impossible."""

    def __init__(self, allowed: Seq[int]) -> None:
        self.allowed = torch.tensor(sorted(set(allowed)), dtype=torch.long)

    def __call__(self, logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
        keep = logits[:, self.allowed]
        logits.fill_(NEG_INF)
        logits[:, self.allowed] = keep
        return logits


class BadWords:
    """`bad_words` (token sequences): a word's last token is impossible where the context ends with the rest of it
    (a one-token word: always)."""

    def __init__(self, words: Seq[tuple[int, ...]]) -> None:
        self.always = sorted({w[0] for w in words if len(w) == 1})
        self.longer = [w for w in words if len(w) > 1]
        self.needs_order = bool(self.longer)  # a word spans positions: diffusion must see what precedes a row

    def __call__(self, logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
        if self.always:
            logits[:, self.always] = NEG_INF
        if self.longer:
            for i, prefix in enumerate(prefixes):
                ctx = _context(seq, prefix)
                for w in self.longer:
                    n = len(w) - 1
                    if len(ctx) >= n and tuple(ctx[-n:]) == w[:-1]:
                        logits[i, w[-1]] = NEG_INF
        return logits


class MinTokens:
    """`min_tokens`: the stop ids (EOS unless ignore_eos, and stop_token_ids) impossible in rows whose position is
    before the min_tokens-th output token."""

    def __init__(self, min_tokens: int, stop_ids: Seq[int]) -> None:
        self.min_tokens = min_tokens
        self.stop = sorted(set(stop_ids))

    def __call__(self, logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
        if not self.stop:
            return logits
        done = seq.num_output_tokens
        rows = [i for i, prefix in enumerate(prefixes) if done + len(prefix) < self.min_tokens]
        if rows:
            logits[torch.tensor(rows)[:, None], torch.tensor(self.stop)[None, :]] = NEG_INF
        return logits


class LogitBias:
    """`logit_bias`: token id -> a number added to its logit."""

    can_empty = False  # bounded biases leave every finite logit finite

    def __init__(self, bias: Seq[tuple[int, float]]) -> None:
        self.ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
        self.values = torch.tensor([b for _, b in bias], dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
        logits[:, self.ids] += self.values.to(logits.device)
        return logits


class Penalties:
    """vLLM's penalties. repetition r over prompt and output tokens: a positive logit divided by r, a negative one
    multiplied by r; frequency f and presence e over output tokens: logit -= f * count + e * (count > 0)."""

    can_empty = False  # bounded penalties leave every finite logit finite

    def __init__(self, presence: float, frequency: float, repetition: float) -> None:
        self.presence, self.frequency, self.repetition = presence, frequency, repetition

    def __call__(self, logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
        # sparse: only the (row, token) pairs that occur are touched, never a [N, V] count table (which cost
        # 1.5 ms per row at a 49k vocabulary)
        vocab = logits.shape[1]
        out_ids = seq.token_ids[seq.num_prompt_tokens:]
        rows, toks = [], []
        for i, prefix in enumerate(prefixes):
            rows.append(torch.full((len(out_ids) + len(prefix),), i, dtype=torch.long))
            toks.append(torch.tensor(out_ids + list(prefix), dtype=torch.long))
        keys, counts = torch.unique(torch.cat(rows) * vocab + torch.cat(toks), return_counts=True)
        if self.repetition != 1.0:
            prompt = torch.unique(torch.tensor(seq.token_ids[:seq.num_prompt_tokens], dtype=torch.long))
            prompt_keys = (torch.arange(len(prefixes))[:, None] * vocab + prompt[None, :]).flatten()
            seen = torch.unique(torch.cat([keys, prompt_keys]))
            r, c = (seen // vocab).to(logits.device), (seen % vocab).to(logits.device)
            vals = logits[r, c]
            logits[r, c] = torch.where(vals > 0, vals / self.repetition, vals * self.repetition)
        if (self.frequency != 0.0 or self.presence != 0.0) and len(keys):
            r, c = (keys // vocab).to(logits.device), (keys % vocab).to(logits.device)
            logits[r, c] -= self.frequency * counts.to(logits.device, torch.float32) + self.presence
        return logits


def build_pipeline(params: SamplingParams, *, stop_ids: Seq[int], mask_id: int | None = None) -> LogitsPipeline | None:
    """The processors `params` asks for (None when it asks for none). `stop_ids`: the sequence's stop set (EOS
    unless ignore_eos, and stop_token_ids), which min_tokens holds back; `mask_id`: the id no row may choose."""
    procs: list[LogitsProcessor] = []
    if params.allowed_token_ids is not None:
        procs.append(AllowedTokens(params.allowed_token_ids))
    if params.bad_words_token_ids:
        procs.append(BadWords(params.bad_words_token_ids))
    if params.min_tokens > 0:
        procs.append(MinTokens(params.min_tokens, stop_ids))
    if params.logit_bias:
        procs.append(LogitBias(params.logit_bias))
    if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0 or params.repetition_penalty != 1.0:
        procs.append(Penalties(params.presence_penalty, params.frequency_penalty, params.repetition_penalty))
    return LogitsPipeline(procs, mask_id) if procs else None
