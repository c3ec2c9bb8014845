"""Decoding modes as per-sequence strategies over two kinds of forward.

A decoder asks, round by round, for the next forward a sequence needs (`next_forward`) and turns that forward's
logit rows into final tokens (`consume`). It keeps its per-sequence state in `seq.state` and never touches the
KV cache or `token_ids` itself: only the returned `Outcome` changes the sequence (tokens emitted, K/V kept).
Prefill is common to all modes and lives in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch

from engine.sampling import token_logprobs
from engine.sequence import Logprob, Sequence


class ForwardKind(Enum):
    CAUSAL = "causal"  # causal mask; the query tokens' K/V is written and may become committed
    BIDIR = "bidir"  # prefix + all query tokens visible; nothing becomes committed


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    name: str  # prefill | ar_decode | denoise | commit | draft | verify (the scheduler's group name)
    kind: ForwardKind
    token_ids: list[int]  # query tokens at positions num_computed_tokens + i
    all_logits: bool = False  # LM head on every query row, not just the last
    draft_lora: bool = False  # o_proj draft adapter (BIDIR only)
    group: tuple = ()  # extra batching key: (steps, block_length) for diffusion, (block_length,) for self_spec


@dataclass(slots=True)
class Outcome:
    new_token_ids: list[int]  # final tokens to emit now (may be empty)
    num_kv_kept: int = 0  # CAUSAL only: written entries that become committed
    spec_draft_tokens: int = 0  # self_spec verify: drafts checked
    spec_accepted: int = 0  # self_spec verify: drafts accepted (bonus excluded)
    denoise_steps: int | None = None  # diffusion: set when a block resolves
    logprobs: list[Logprob] | None = None  # aligned with new_token_ids when the request asked for logprobs


@dataclass(frozen=True)
class DecodeEnv:
    """What decoders need from the engine: special ids and the draft-LoRA switches."""

    mask_id: int | None
    spec_lora: bool = False
    diffusion_lora: bool = False


def chosen(tokens: list[int], rows: torch.Tensor, seq: Sequence, env: DecodeEnv, **kw) -> Outcome:
    """An Outcome emitting `tokens`, each chosen from the matching row of `rows`, with logprobs when asked for."""
    k = seq.params.logprobs
    lps = None if k is None else token_logprobs(rows, tokens, k, env.mask_id)
    return Outcome(tokens, logprobs=lps, **kw)


class Decoder(Protocol):
    def next_forward(self, seq: Sequence, env: DecodeEnv) -> ForwardRequest:
        """The forward `seq` needs next (called only after prefill)."""
        ...

    def consume(self, seq: Sequence, req: ForwardRequest, logits: torch.Tensor, env: DecodeEnv) -> Outcome:
        """Logit rows of `req` (all rows, or the last one) -> what becomes final."""
        ...


from engine.decoding.ar import AR  # noqa: E402
from engine.decoding.diffusion import BlockDiffusion  # noqa: E402
from engine.decoding.spec import SelfSpec  # noqa: E402

DECODERS: dict[str, Decoder] = {"ar": AR(), "diffusion": BlockDiffusion(), "self_spec": SelfSpec()}
