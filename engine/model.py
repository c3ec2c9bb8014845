"""The Mistral-class transformer behind every checkpoint trimode serves.

Nemotron-Labs-Diffusion is a Ministral-3 backbone (`encoder.*`) plus an untied `diffusion_head`, the only LM head
for AR and diffusion logits alike; plain Llama/Mistral checkpoints (`model.*`, `lm_head` or tied embeddings) map
onto the same modules at load time. Tokens are flattened across the batch (`[T]`, ragged, no padding): the model
sees `(input_ids, positions, ctx)` and all attention metadata travels in `ctx`, an `AttentionContext` that owns
each sequence's attention pattern (causal and writing KV, or bidirectional and read-only) and which rows get the
draft LoRA on `o_proj`; one forward may mix them. The kind of pass is therefore an argument of each forward, never
module state. Under tensor parallelism (engine/parallel/) each rank's model holds its share of the heads and
intermediate features, and `Attention` / `MLP` sum their row-parallel output over the ranks with `reduce`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.cpu_kernels import TORCH_OPS, FusedCpuOps, TorchOps
from engine.cpu_linear import PackableLinear
from engine.model_config import ModelConfig, RopeConfig

Reduce = Callable[[torch.Tensor], torch.Tensor]  # in-place sum over the tensor-parallel ranks (engine/parallel)


class AttentionContext(Protocol):
    """What a forward needs besides token ids and positions (see `engine/attention.py`)."""

    draft_lora: bool | slice | torch.Tensor  # rows that get the draft adapter: all, none, a range or an index

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] after RoPE -> attention output [T, Hq, D]."""
        ...


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin attention factor, ported from transformers' `default` and `yarn` inits."""
    dim = head_dim
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    orig = rope.original_max_position_embeddings
    if factor is None or orig is None:
        raise ValueError("yarn rope needs 'factor' and 'original_max_position_embeddings'")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, float(attention_factor)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops: TorchOps | FusedCpuOps = TORCH_OPS  # swapped by `TriModeModel.set_ops`

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(r), r) with r = x + residual (the residual stream after this sub-layer), or r = x."""
        return self.ops.rms_norm(x, residual, self.weight, self.eps)


class LoRALinear(PackableLinear):
    """`o_proj` with an optional draft-only LoRA (`y = W x + scale * B(A x)`), applied when the context asks."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.lora_A: nn.Parameter | None = None  # [r, in]
        self.lora_B: nn.Parameter | None = None  # [out, r]
        self.lora_scale = 0.0

    def set_lora(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.lora_A = nn.Parameter(a.to(self.weight.dtype), requires_grad=a.requires_grad)
        self.lora_B = nn.Parameter(b.to(self.weight.dtype), requires_grad=b.requires_grad)
        self.lora_scale = scale

    def forward_lora(self, x: torch.Tensor, rows: bool | slice | torch.Tensor) -> torch.Tensor:
        """W x on every row, plus the adapter's delta on `rows`: all (True), none (False), a row range or an index
        tensor (a forward mixing draft rows with others: the delta only where a sequence asked for it)."""
        y = super().forward(x)
        if self.lora_A is None or rows is False:
            return y
        if rows is True:
            return y + self.lora_scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        delta = self.lora_scale * F.linear(F.linear(x[rows], self.lora_A), self.lora_B)  # [R, out]
        if isinstance(rows, slice):
            y[rows] += delta
        else:
            y.index_add_(0, rows, delta)
        return y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim  # NOTE: never hidden / heads: 3B and 14B differ
        self.q_proj: PackableLinear | None = PackableLinear(cfg.hidden_size, self.num_heads * self.head_dim)
        self.k_proj: PackableLinear | None = PackableLinear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj: PackableLinear | None = PackableLinear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
        self.qkv_proj: PackableLinear | None = None  # set by `fuse`
        self.o_proj = LoRALinear(self.num_heads * self.head_dim, cfg.hidden_size)
        self.ops: TorchOps | FusedCpuOps = TORCH_OPS
        self.reduce: Reduce | None = None  # tensor parallelism: sums o_proj's partial outputs over the ranks

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace q/k/v_proj by one `qkv_proj` over their concatenated weights: one GEMM instead of three."""
        if self.qkv_proj is None:
            parts = [self.q_proj, self.k_proj, self.v_proj]
            self.qkv_proj = _stacked(parts)
            self.q_proj = self.k_proj = self.v_proj = None

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        cos: torch.Tensor,  # [T, 1, D]
        sin: torch.Tensor,  # [T, 1, D], first half negated (see `TriModeModel.rope`)
        q_scale: torch.Tensor | None,  # [T, 1, 1] Llama-4 query scale, None below the threshold
        ctx: AttentionContext,
    ) -> torch.Tensor:
        t, nq, nkv = x.shape[0], self.num_heads, self.num_kv_heads
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        qk = self.ops.rope(qkv, cos, sin, nq + nkv)  # q's and k's heads in one rotation
        q, k, v = qk[:, :nq], qk[:, nq:], qkv.view(t, nq + 2 * nkv, self.head_dim)[:, nq + nkv:]
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        out = ctx.attend(self.layer_idx, q, k, v)  # [T, Hq, D]
        y = self.o_proj.forward_lora(out.reshape(t, -1), ctx.draft_lora)  # a rank's partial sum, LoRA delta included
        return y if self.reduce is None else self.reduce(y)


def _stacked(parts: list[PackableLinear | None]) -> PackableLinear:
    """One bias-free linear whose output is the outputs of `parts`, concatenated (unpacked: pack after fusing)."""
    assert all(p is not None and p.packed is None for p in parts), "fuse before packing"
    weight = torch.cat([p.weight for p in parts], dim=0)
    with torch.device("meta"):  # no throwaway init of a weight about to be replaced
        fused = PackableLinear(weight.shape[1], weight.shape[0])
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj: PackableLinear | None = PackableLinear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj: PackableLinear | None = PackableLinear(cfg.hidden_size, cfg.intermediate_size)
        self.gate_up_proj: PackableLinear | None = None  # set by `fuse`
        self.down_proj = PackableLinear(cfg.intermediate_size, cfg.hidden_size)
        self.ops: TorchOps | FusedCpuOps = TORCH_OPS
        self.reduce: Reduce | None = None  # tensor parallelism: sums down_proj's partial outputs over the ranks

    @torch.no_grad()
    def fuse(self) -> None:
        """Replace gate/up_proj by one `gate_up_proj`: one GEMM instead of two."""
        if self.gate_up_proj is None:
            self.gate_up_proj = _stacked([self.gate_proj, self.up_proj])
            self.gate_proj = self.up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
        else:
            gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        y = self.down_proj(self.ops.silu_mul(gate_up))
        return y if self.reduce is None else self.reduce(y)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                q_scale: torch.Tensor | None, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream before it): the next norm adds the two, so each add rides with a norm."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, q_scale, ctx), residual)
        return self.mlp(h), residual


class Encoder(nn.Module):
    """The Ministral-3 stack (`encoder.*` in NLD checkpoints, `model.*` in plain ones)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TriModeModel(nn.Module):
    """`forward(input_ids [T], positions [T], ctx)` -> final hidden states [T, H]; `logits(h)` applies the head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = PackableLinear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.diffusion_head.weight = self.encoder.embed_tokens.weight
        inv_freq, attn_factor = rope_inv_freq(cfg.rope, cfg.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_factor = attn_factor

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, D] of each position, as transformers computes them, with sin's first half negated."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2], fp32 as transformers
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        return (cos * self.attention_factor).to(dtype)[:, None], (sin * self.attention_factor).to(dtype)[:, None]

    def query_scale(self, positions: torch.Tensor) -> torch.Tensor | None:
        beta = self.cfg.rope.llama_4_scaling_beta
        orig = self.cfg.rope.original_max_position_embeddings
        if beta is None or orig is None:
            return None
        # 1 + beta * ln(1 + floor(pos / orig)); exactly 1.0 below `orig`, so skipping it there changes nothing
        if int(positions.max()) < orig:
            return None
        scale = 1 + beta * torch.log(1 + torch.floor(positions.float() / orig))
        return scale[:, None, None]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = self.encoder.embed_tokens(input_ids)  # [T, H]
        cos, sin = self.rope(positions, h.dtype)
        q_scale = self.query_scale(positions)
        residual = None
        for layer in self.encoder.layers:
            h, residual = layer(h, residual, cos, sin, q_scale, ctx)
        return self.encoder.norm(h, residual)[0]

    def set_ops(self, ops: TorchOps | FusedCpuOps) -> None:
        """Run the norms, RoPE and SwiGLU through `ops` (the runner installs `FusedCpuOps` on CPU inference)."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP)):
                m.ops = ops

    def set_reduce(self, reduce: Reduce | None) -> None:
        """Tensor parallelism: after o_proj and after down_proj, sum the ranks' partial outputs with `reduce`."""
        for m in self.modules():
            if isinstance(m, (Attention, MLP)):
                m.reduce = reduce

    def fuse_projections(self) -> None:
        """Inference layout: q/k/v and gate/up each become one linear. The state dict then no longer has the
        checkpoint's names, so fuse only a model that serves (the runner does, before packing), never one to save."""
        for layer in self.encoder.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.diffusion_head(hidden).float()  # [N, V]
