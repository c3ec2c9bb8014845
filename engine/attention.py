"""Attention contexts: the two kinds of forward, over a paged KV cache or over the query tokens alone.

Every forward is one of two kinds:
- causal (`causal=True`): query token i of a sequence sees the cached prefix and query tokens <= i;
- bidirectional (`causal=False`): every query token sees the cached prefix and all query tokens.

`PagedContext` always stores the query tokens' K/V into the slots the block manager provided past
`num_computed_tokens`; whether they become *committed* is the engine's business (a bidirectional pass never
advances `num_computed_tokens`, so its K/V is scratch the next forward overwrites). This keeps one code path
for both kinds: they differ only in the mask. On CUDA with flash-attn installed, the paged varlen kernel reads
the block tables directly; elsewhere torch SDPA runs over the pages gathered into a padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # optional: only on CUDA hosts with the `gpu` extra
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_varlen_func = None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool):
    # q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D]; GQA by repeating KV heads (portable across torch builds)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


@dataclass
class DenseContext:
    """No KV cache: each sequence attends over its own query tokens (reference recompute, tests, training).

    `cu_seqlens` splits the flat token axis into sequences ([0, T] for one sequence).
    """

    cu_seqlens: list[int]
    causal: bool = True
    draft_lora: bool = False

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        for s, e in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]):
            qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
            outs.append(_sdpa(qs, ks, vs, None, self.causal)[0].transpose(0, 1))
        return torch.cat(outs, dim=0)


@dataclass
class KVCache:
    """The paged pool: `k[layer]`, `v[layer]` are [num_blocks, block_size, Hkv, D]."""

    k: torch.Tensor  # [layers, num_blocks, block_size, Hkv, D]
    v: torch.Tensor

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> KVCache:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


@dataclass
class PagedContext:
    """Attention over the paged cache for a ragged batch of sequences.

    q_lens[b] query tokens of sequence b sit at positions k_lens[b] - q_lens[b] ... k_lens[b] - 1; their K/V goes
    to `slot_mapping` (flat slot = block * block_size + offset) before attention reads the pages.
    """

    cache: KVCache
    causal: bool
    draft_lora: bool
    q_lens: list[int]
    k_lens: list[int]  # context length of each sequence *including* this forward's query tokens
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor  # [T] int64
    use_flash: bool = False
    _prepared: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        device = self.slot_mapping.device
        bs = self.cache.block_size
        b = len(self.q_lens)
        if self.use_flash:
            max_blocks = max(len(t) for t in self.block_tables)
            tables = torch.zeros((b, max_blocks), dtype=torch.int32)
            for i, t in enumerate(self.block_tables):
                tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
            cu_q = torch.tensor([0, *torch.tensor(self.q_lens).cumsum(0).tolist()], dtype=torch.int32)
            cu_k = torch.tensor([0, *torch.tensor(self.k_lens).cumsum(0).tolist()], dtype=torch.int32)
            self._prepared = dict(tables=tables.to(device), cu_q=cu_q.to(device), cu_k=cu_k.to(device))
            return
        max_q, max_k = max(self.q_lens), max(self.k_lens)
        # gather index of every key slot [B, max_k] and of every query row [B, max_q] (-1 = padding)
        kv_idx = torch.zeros((b, max_k), dtype=torch.long)
        q_idx = torch.full((b, max_q), -1, dtype=torch.long)
        q_pos = torch.zeros((b, max_q), dtype=torch.long)
        k_valid = torch.zeros((b, max_k), dtype=torch.bool)
        start = 0
        for i, (ql, kl, table) in enumerate(zip(self.q_lens, self.k_lens, self.block_tables)):
            pos = torch.arange(kl)
            kv_idx[i, :kl] = torch.tensor(table, dtype=torch.long)[pos // bs] * bs + pos % bs
            k_valid[i, :kl] = True
            q_idx[i, :ql] = torch.arange(start, start + ql)
            q_pos[i, :ql] = torch.arange(kl - ql, kl)
            start += ql
        key_pos = torch.arange(max_k)
        mask = k_valid[:, None, :].expand(b, max_q, max_k)
        if self.causal:
            mask = mask & (key_pos[None, None, :] <= q_pos[:, :, None])
        # padded query rows attend to key 0 so that SDPA never sees an all-masked row (their output is dropped)
        mask = mask | ((q_idx < 0)[:, :, None] & (key_pos == 0)[None, None, :])
        q_rows = q_idx.clamp(min=0)
        self._prepared = dict(
            kv_idx=kv_idx.to(device), mask=mask[:, None].to(device), q_rows=q_rows.to(device),
            q_flat=(q_idx >= 0).flatten().nonzero().squeeze(1).to(device),
        )

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        hkv, d = kc.shape[-2], kc.shape[-1]
        kc.view(-1, hkv, d)[self.slot_mapping] = k.to(kc.dtype)
        vc.view(-1, hkv, d)[self.slot_mapping] = v.to(vc.dtype)
        p = self._prepared
        if self.use_flash:
            return flash_attn_varlen_func(
                q, kc, vc, p["cu_q"], p["cu_k"], max(self.q_lens), max(self.k_lens),
                causal=self.causal, block_table=p["tables"],
            )
        keys = kc.view(-1, hkv, d)[p["kv_idx"]].transpose(1, 2)  # [B, Hkv, max_k, D]
        vals = vc.view(-1, hkv, d)[p["kv_idx"]].transpose(1, 2)
        qb = q[p["q_rows"]].transpose(1, 2)  # [B, Hq, max_q, D]
        out = _sdpa(qb, keys.to(q.dtype), vals.to(q.dtype), p["mask"], self.causal)  # [B, Hq, max_q, D]
        out = out.transpose(1, 2).flatten(0, 1)  # [B*max_q, Hq, D]
        return out[p["q_flat"]]


def flash_available(device: torch.device, block_size: int) -> bool:
    """flash-attn's paged varlen kernel: CUDA only, and page sizes that are a multiple of 256 (flash-attn 2)."""
    return flash_attn_varlen_func is not None and device.type == "cuda" and block_size % 256 == 0


@dataclass
class MaskedContext:
    """No KV cache, one sequence, an explicit boolean mask [T, T] (True = may attend). For references and tests."""

    mask: torch.Tensor
    draft_lora: bool = False

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))
        return _sdpa(qs, ks, vs, self.mask[None, None], False)[0].transpose(0, 1)
