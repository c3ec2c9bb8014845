"""TensorShard: the slice of each checkpoint tensor one rank holds, and that rank's model geometry.

Megatron's split of a Llama/Mistral layer over `world` ranks: q/k/v and gate/up are column-parallel (each rank
computes its share of the heads and of the intermediate features: rows of the weight), o_proj and down are
row-parallel (each rank multiplies its share of the input features: columns of the weight; the partial outputs
are summed by one all-reduce per layer). Query heads are split in `world` contiguous groups and KV heads alike, so
rank r's query heads read only rank r's KV heads (GQA groups never straddle ranks) and each rank's KV pages hold
only its heads. The draft LoRA rides on o_proj: `scale * B (A x)` is linear in x, so A is split by the same input
columns and B replicated; each rank adds its partial delta before the same all-reduce.

Embeddings are replicated (a lookup costs nothing; vocab-parallel would add an all-reduce of [T, H] per forward),
and the LM head (`diffusion_head`, also the AR head) is held by rank 0 alone: the decoders run there and need the
full logits, which a vocab-parallel head would have to gather from every rank (see docs/memory.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.model_config import ModelConfig

_COLUMN_PARALLEL = {  # weight name suffix -> what its output rows are split by
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "kv", "self_attn.v_proj.weight": "kv",
    "mlp.gate_proj.weight": "mlp", "mlp.up_proj.weight": "mlp",
}
_ROW_PARALLEL = {"self_attn.o_proj.weight": "q", "mlp.down_proj.weight": "mlp"}  # split by input columns
HEAD = "diffusion_head.weight"


def check_tensor_parallel_size(cfg: ModelConfig, size: int) -> None:
    """ValueError naming `tensor_parallel_size` unless `size` ranks can each take an equal share of the heads."""
    for field, count in (("num_key_value_heads", cfg.num_key_value_heads),
                         ("num_attention_heads", cfg.num_attention_heads),
                         ("intermediate_size", cfg.intermediate_size)):
        if count % size:
            raise ValueError(f"engine config: tensor_parallel_size={size} does not divide the checkpoint's "
                             f"{field}={count} (each rank takes an equal share of them)")


@dataclass(frozen=True, slots=True)
class TensorShard:
    rank: int
    world: int

    def rank_config(self, cfg: ModelConfig) -> ModelConfig:
        """The geometry of this rank's model: its share of the heads and intermediate features (head_dim kept)."""
        check_tensor_parallel_size(cfg, self.world)
        return replace(cfg, num_attention_heads=cfg.num_attention_heads // self.world,
                       num_key_value_heads=cfg.num_key_value_heads // self.world,
                       intermediate_size=cfg.intermediate_size // self.world)

    @property
    def holds_head(self) -> bool:
        return self.rank == 0

    def _span(self, cfg: ModelConfig, split: str) -> tuple[int, int]:
        size = {"q": cfg.num_attention_heads * cfg.head_dim, "kv": cfg.num_key_value_heads * cfg.head_dim,
                "mlp": cfg.intermediate_size}[split]
        part = size // self.world
        return self.rank * part, (self.rank + 1) * part

    def take(self, cfg: ModelConfig, name: str, tensor: Any) -> torch.Tensor | None:
        """This rank's part of checkpoint tensor `name` (model names, e.g. `encoder.layers.0.mlp.up_proj.weight`),
        read from `tensor`, a torch tensor or a safetensors slice (only the part is read); None when this rank
        holds none of it. `cfg` is the full model's config."""
        if name == HEAD and not self.holds_head:
            return None
        for suffix, split in _COLUMN_PARALLEL.items():
            if name.endswith(suffix):
                a, b = self._span(cfg, split)
                return tensor[a:b]
        for suffix, split in _ROW_PARALLEL.items():
            if name.endswith(suffix):
                a, b = self._span(cfg, split)
                return tensor[:, a:b]
        return tensor[:] if not isinstance(tensor, torch.Tensor) else tensor

    def take_lora(self, cfg: ModelConfig, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The o_proj adapter's A [r, in] split with o_proj's input columns; B [out, r] whole on every rank."""
        lo, hi = self._span(cfg, "q")
        return a[:, lo:hi].contiguous(), b
