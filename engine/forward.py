"""What a forward is: its name (`Forward`), what one sequence asks of it (`ForwardRequest`), and the key that
groups sequences into sections of a forward (`BatchKey`). Torch-free, so `StepStats` and the server's metrics can
name forwards without loading the model code.

Every running sequence's next forward rides in the same engine forward, whatever its name: the key only groups
the rows into sections (for attention plans, fairness and metrics), it never splits a step into forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Forward(str, Enum):
    """The forwards a sequence can need; the value is the `forward_kind` label of the metrics.

    A causal forward masks causally and writes the query tokens' K/V, which may become committed; a
    bidirectional one sees the prefix and every query token and commits nothing (read-only).
    """

    PREFILL = "prefill"  # every mode: the prompt (chunked), or the tokens to recompute after preemption
    AR_DECODE = "ar_decode"  # ar: the newest token
    DENOISE = "denoise"  # diffusion: one refinement step over the block (bidirectional)
    COMMIT = "commit"  # diffusion: the resolved block's K/V, and the next block's seed
    DRAFT = "draft"  # self_spec: fill the block's masks (bidirectional)
    VERIFY = "verify"  # self_spec: the AR tokens for the drafted block, writing its K/V

    def __str__(self) -> str:  # Prometheus labels and log lines show the value, not `Forward.PREFILL`
        return self.value

    @property
    def causal(self) -> bool:
        return self not in _BIDIRECTIONAL


_BIDIRECTIONAL = frozenset({Forward.DENOISE, Forward.DRAFT})


@dataclass(frozen=True, slots=True)
class BatchKey:
    """Sequences whose next forwards have equal keys form one section of a forward: same forward, same adapter, and
    the same mode knobs where they shape the forward (None where a forward has no such knob). Sections of every
    key share one forward; the key orders the rows and names them in the metrics."""

    forward: Forward
    draft_lora: bool = False  # o_proj draft adapter on (bidirectional forwards only)
    block_length: int | None = None  # diffusion and self_spec forwards: the block being decoded
    steps: int | None = None  # diffusion denoise: the refinement-step budget per block


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """One sequence's part of a forward: its query tokens, at positions `num_computed_tokens + i`."""

    key: BatchKey
    token_ids: list[int]
    all_logits: bool = False  # LM head on every query row, not just the last

    @property
    def forward(self) -> Forward:
        return self.key.forward
