"""The decoder interface: what a mode's decoder is asked (`Decoder`), what it may read of the engine
(`DecoderContext`), and what it answers (`Outcome`).

A decoder asks, round by round, for the next forward a sequence needs (`next_forward`) and turns that forward's
logit rows into final tokens (`outcome_from_logits`). It keeps its per-sequence state in `seq.state` and never
touches the KV cache or `token_ids` itself: only the returned `Outcome` changes the sequence (tokens emitted, K/V
kept), and the engine applies it the same way for every mode. Prefill is common to all modes and lives in the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.forward import ForwardRequest
from engine.sampling import token_logprobs
from engine.sequence import Logprob, Sequence

if TYPE_CHECKING:
    from engine.decoding.auto import AutoPlanner


@dataclass(slots=True)
class Outcome:
    """What one forward made final for one sequence. The engine adds `counters` up per step and collects
    `observations` without knowing their names (`engine.decoding.modes` lists them)."""

    new_token_ids: list[int]  # final tokens to emit now (may be empty)
    num_kv_kept: int = 0  # causal forwards only: written entries that become committed
    logprobs: list[Logprob] | None = None  # aligned with new_token_ids when the request asked for logprobs
    counters: dict[str, int] = field(default_factory=dict)  # name -> amount to add
    observations: dict[str, float] = field(default_factory=dict)  # name -> one histogram observation


@dataclass(frozen=True)
class DecoderContext:
    """What decoders need from the engine: the mask id, which bidirectional forwards use the draft LoRA, and the
    engine's `auto` planner (its forward costs and acceptance estimates; None on a plain causal checkpoint)."""

    mask_id: int | None
    spec_lora: bool = False  # self_spec drafts
    diffusion_lora: bool = False  # diffusion denoise steps
    auto: AutoPlanner | None = field(default=None, compare=False)


def emit_tokens(tokens: list[int], rows: torch.Tensor, seq: Sequence, ctx: DecoderContext, *, num_kv_kept: int = 0,
                counters: dict[str, int] | None = None) -> Outcome:
    """An Outcome emitting `tokens`, each chosen from the matching row of `rows`, with logprobs when asked for."""
    k = seq.params.logprobs
    lps = None if k is None else token_logprobs(rows, tokens, k, ctx.mask_id)
    return Outcome(tokens, num_kv_kept=num_kv_kept, logprobs=lps, counters=counters or {})


class Decoder(ABC):
    """One mode's decoding, for any number of sequences (all per-sequence state lives in `seq.state`)."""

    @abstractmethod
    def next_forward(self, seq: Sequence, ctx: DecoderContext) -> ForwardRequest:
        """The forward `seq` needs next (called only after prefill)."""

    @abstractmethod
    def outcome_from_logits(self, seq: Sequence, req: ForwardRequest, logits: torch.Tensor,
                            ctx: DecoderContext) -> Outcome:
        """Logit rows of `req` (all rows, or the last one) -> what becomes final."""

    def reset_for_recompute(self, seq: Sequence) -> bool:
        """`seq` was preempted: its K/V is dropped and will be recomputed from `token_ids` by a prefill. Forget the
        round in flight; True when tokens already emitted by it make that prefill's last logit give the next token
        (the forward the round still owed would have done so)."""
        seq.state = None
        return False

    def describe(self, seq: Sequence) -> str | None:
        """How `seq` was decoded, for the request's log line, when the mode alone does not say it (`auto`)."""
        return None
