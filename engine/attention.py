"""Attention contexts: the two kinds of forward, over a paged KV cache or over the query tokens alone.

Every forward is one of two kinds:
- causal (`causal=True`): query token i of a sequence sees the cached prefix and query tokens <= i;
- bidirectional (`causal=False`): every query token sees the cached prefix and all query tokens.

`PagedContext` always stores the query tokens' K/V into the slots the block manager provided past
`num_computed_tokens`; whether they become *committed* is the engine's business (a bidirectional pass never
advances `num_computed_tokens`, so its K/V is scratch the next forward overwrites). This keeps one code path
for both kinds: they differ only in the mask. On CUDA with flash-attn installed, the paged varlen kernel reads
the block tables directly; elsewhere torch SDPA runs over the pages gathered into a padded batch, except that on
CPU a decode plan (one query per sequence) goes to `decode_kernel` when the runner has the fused CPU kernels,
which reads the pages in place (engine/cpu_kernels.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # optional: only on CUDA hosts with the `gpu` extra
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_varlen_func = None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool):
    # q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D]; SDPA's own GQA reads each KV head for its query group (no copies)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


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
    flat_k: list[torch.Tensor] = field(init=False)  # per layer, a [num_blocks * block_size, Hkv, D] view of k
    flat_v: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        # views made once: a decode step would otherwise spend 4 tensor ops per layer re-deriving them
        hkv, d = self.k.shape[-2:]
        self.flat_k = [layer.view(-1, hkv, d) for layer in self.k]
        self.flat_v = [layer.view(-1, hkv, d) for layer in self.v]

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

    q_lens[b] query tokens of sequence b sit at positions k_lens[b] - q_lens[b] ... k_lens[b] - 1 (`positions`);
    their K/V goes to `slot_mapping` (flat slot = block * block_size + offset) before attention reads the pages.
    Every index tensor and the mask are built once per forward, vectorised; `attend` runs per layer and only
    writes, gathers and calls the kernel. Decode batches (one query per sequence) need no query gather and no
    causal mask; a lone sequence needs no padding. A mixed batch (one-token decodes next to prefill chunks, see the
    scheduler) runs as two plans, so that the decodes' single queries are not padded to the prefills' length.
    """

    cache: KVCache
    causal: bool
    draft_lora: bool
    q_lens: list[int]
    k_lens: list[int]  # context length of each sequence *including* this forward's query tokens
    block_tables: list[list[int]]
    use_flash: bool = False
    # (q [B, Hq, D], flat k cache, flat v cache, tables [B, max_blocks], lens [B], block_size) -> [B, Hq, D]: reads
    # the pages in place for one-query-per-sequence plans (`FusedCpuOps.decode_attention`); None = gather + SDPA
    decode_kernel: Callable[..., torch.Tensor] | None = None
    positions: torch.Tensor = field(init=False)  # [T] int64, position of every query token
    slot_mapping: torch.Tensor = field(init=False)  # [T] int64, cache slot of every query token
    _prepared: dict = field(default_factory=dict, init=False)
    _plans: list[dict] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        device = self.cache.k.device
        bs = self.cache.block_size
        b, t = len(self.q_lens), sum(self.q_lens)
        max_blocks = max(len(tb) for tb in self.block_tables)
        tables = torch.tensor([tb + [0] * (max_blocks - len(tb)) for tb in self.block_tables])  # [B, max_blocks]
        q_lens, k_lens = torch.tensor(self.q_lens), torch.tensor(self.k_lens)  # [B]
        q_start = q_lens.cumsum(0) - q_lens  # [B] first flat row of each sequence
        seq_of = torch.repeat_interleave(torch.arange(b), q_lens)  # [T]
        pos = (k_lens - q_lens)[seq_of] + torch.arange(t) - q_start[seq_of]  # [T]
        self.positions = pos.to(device)
        self.slot_mapping = (tables[seq_of, pos // bs] * bs + pos % bs).to(device)
        if self.use_flash:
            zero = torch.zeros(1, dtype=torch.long)
            cu_q, cu_k = torch.cat([zero, q_lens.cumsum(0)]), torch.cat([zero, k_lens.cumsum(0)])
            self._prepared = dict(tables=tables.to(device, torch.int32), cu_q=cu_q.to(device, torch.int32),
                                  cu_k=cu_k.to(device, torch.int32), max_q=max(self.q_lens), max_k=max(self.k_lens))
            return
        singles = [i for i, n in enumerate(self.q_lens) if n == 1]
        if 0 < len(singles) < b:
            multis = [i for i, n in enumerate(self.q_lens) if n > 1]
            for part in (singles, multis):
                plan = self._plan(part, tables)
                idx = torch.tensor(part)
                plan["rows"] = torch.cat([torch.arange(int(q_start[i]), int(q_start[i] + q_lens[i]))
                                          for i in idx]).to(device)
                self._plans.append(plan)
        else:
            self._plans.append(self._plan(list(range(b)), tables))

    def _plan(self, part: list[int], all_tables: torch.Tensor) -> dict:
        """Gather indices, mask and kernel path for the sequences `part` (their query rows, concatenated)."""
        device, dtype = self.cache.k.device, self.cache.k.dtype
        bs = self.cache.block_size
        q_list, k_list = [self.q_lens[i] for i in part], [self.k_lens[i] for i in part]
        b, t = len(part), sum(q_list)
        q_lens, k_lens = torch.tensor(q_list), torch.tensor(k_list)
        q_start = q_lens.cumsum(0) - q_lens
        max_q, max_k = max(q_list), max(k_list)
        tables = all_tables[torch.tensor(part)]
        if max_q == 1 and self.decode_kernel is not None:
            return dict(path="decode_kernel", tables=tables.to(device), lens=k_lens.to(device))
        key_pos = torch.arange(max_k)
        kv_idx = tables[:, key_pos // bs] * bs + key_pos % bs  # [B, max_k] (padding -> a slot of block 0, masked)
        k_valid = key_pos[None, :] < k_lens[:, None]  # [B, max_k]
        p: dict = dict(kv_idx=kv_idx.flatten().to(device), shape=(b, max_k), is_causal=False, kv_start=None)
        first = self.block_tables[part[0]]
        if b == 1 and first == list(range(first[0], first[0] + len(first))):
            p["kv_start"] = first[0] * bs  # a lone sequence on consecutive pages: read them as one slice, no gather
        if max_q == 1:  # decode: the only query sees every key of its sequence, causal or not
            p.update(path="decode", mask=None if bool(k_valid.all()) else _additive(k_valid[:, None, None, :], dtype,
                                                                                     device))
        elif b == 1 and (not self.causal or max_k == max_q):
            # a lone sequence, bidirectional over everything or a fresh causal prefill: no mask at all
            p.update(path="single", mask=None, is_causal=self.causal)
        else:
            q_off = torch.arange(max_q)
            q_valid = q_off[None, :] < q_lens[:, None]  # [B, max_q]
            q_pos = (k_lens - q_lens)[:, None] + q_off[None, :]  # [B, max_q]
            mask = k_valid[:, None, :].expand(b, max_q, max_k)
            if self.causal:
                mask = mask & (key_pos[None, None, :] <= q_pos[:, :, None])
            # padded query rows attend to key 0 so that SDPA never sees an all-masked row (their output is dropped)
            mask = mask | (~q_valid[:, :, None] & (key_pos == 0)[None, None, :])
            p.update(path="single" if b == 1 else "padded", mask=_additive(mask[:, None], dtype, device),
                     q_rows=(q_start[:, None] + q_off[None, :]).clamp(max=t - 1).to(device),
                     q_flat=q_valid.flatten().nonzero().squeeze(1).to(device))
        return p

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        flat_k, flat_v = self.cache.flat_k[layer_idx], self.cache.flat_v[layer_idx]
        flat_k.index_copy_(0, self.slot_mapping, k)  # the runner allocates the cache in the model's dtype
        flat_v.index_copy_(0, self.slot_mapping, v)
        if self.use_flash:
            p = self._prepared
            return flash_attn_varlen_func(q, self.cache.k[layer_idx], self.cache.v[layer_idx], p["cu_q"], p["cu_k"],
                                          p["max_q"], p["max_k"], causal=self.causal, block_table=p["tables"])
        if len(self._plans) == 1:
            return self._attend_plan(self._plans[0], q, flat_k, flat_v)
        out = torch.empty_like(q)
        for p in self._plans:
            out[p["rows"]] = self._attend_plan(p, q[p["rows"]], flat_k, flat_v)
        return out

    def _attend_plan(self, p: dict, q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor) -> torch.Tensor:
        if p["path"] == "decode_kernel":
            return self.decode_kernel(q, flat_k, flat_v, p["tables"], p["lens"], self.cache.block_size)
        hkv, d = flat_k.shape[-2], flat_k.shape[-1]
        b, max_k = p["shape"]
        if p["kv_start"] is None:
            keys = flat_k.index_select(0, p["kv_idx"]).view(b, max_k, hkv, d).transpose(1, 2)  # [B, Hkv, max_k, D]
            vals = flat_v.index_select(0, p["kv_idx"]).view(b, max_k, hkv, d).transpose(1, 2)
        else:
            start, end = p["kv_start"], p["kv_start"] + max_k
            keys = flat_k[start:end].view(1, max_k, hkv, d).transpose(1, 2)  # [1, Hkv, max_k, D], a view
            vals = flat_v[start:end].view(1, max_k, hkv, d).transpose(1, 2)
        if p["path"] == "decode":  # row i of q is sequence i's only query
            return _sdpa(q[:, :, None], keys, vals, p["mask"], False)[:, :, 0]  # [B, Hq, 1, D] -> [T, Hq, D]
        if p["path"] == "single":  # the flat token axis is the sequence
            out = _sdpa(q[None].transpose(1, 2), keys, vals, p["mask"], p["is_causal"])  # [1, Hq, T, D]
            return out[0].transpose(0, 1)
        qb = q[p["q_rows"]].transpose(1, 2)  # [B, Hq, max_q, D]
        out = _sdpa(qb, keys, vals, p["mask"], False)  # [B, Hq, max_q, D]
        return out.transpose(1, 2).flatten(0, 1)[p["q_flat"]]


def _additive(allowed: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # bool mask -> 0 / -inf once per forward (SDPA would convert a bool mask in every layer)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf")).to(device)


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
