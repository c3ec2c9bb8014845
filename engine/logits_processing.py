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

from engine.sequence import SamplingParams, Sequence

NEG_INF = float("-inf")
log = logging.getLogger("trimode.engine")


class LogitsProcessor(Protocol):
    def __call__(self, logits: torch.Tensor, seq: Sequence, prefixes: Seq[tuple[int, ...]]) -> torch.Tensor:
        """Rows [N, V] fp32 (a private copy: in-place edits are fine) -> processed rows."""


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
