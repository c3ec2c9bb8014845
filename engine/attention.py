"""Attention contexts: the two kinds of mask, over a paged KV cache or over the query tokens alone.

Every sequence in a forward has one of two masks, and one forward may hold both:
- causal: query token i of a sequence sees the cached prefix and query tokens <= i;
- bidirectional: every query token sees the cached prefix and all query tokens of its block.

`PagedContext` always stores the query tokens' K/V into the slots the block manager provided past
`num_computed_tokens`; whether they become *committed* is the engine's business (a bidirectional pass never
advances `num_computed_tokens`, so its K/V is scratch the next forward overwrites). This keeps one code path
for both kinds: they differ only in the mask, chosen per sequence. On CUDA with flash-attn installed, the paged
varlen kernel reads the block tables directly, one call per mask kind; on CPU with the fused kernels
(engine/cpu_kernels.py) one call reads the pages in place for every short sequence (decodes and blocks, causal or
not); elsewhere, and for long prefill chunks, torch SDPA runs over the pages gathered into a padded batch.
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
    """Attention over the paged cache for a ragged batch of sequences, each with its own mask.

    q_lens[b] query tokens of sequence b sit at positions k_lens[b] - q_lens[b] ... k_lens[b] - 1 (`positions`);
    their K/V goes to `slot_mapping` (flat slot = block * block_size + offset) before attention reads the pages,
    so a bidirectional sequence's block sees itself; only a causal forward's entries can become committed (the
    engine's business: a bidirectional forward never advances `num_computed_tokens`, so its entries are scratch
    the next forward overwrites). `causal[b]` is sequence b's mask: causal (query i sees the prefix and query
    tokens <= i) or bidirectional (every query token sees the prefix and the whole block).

    Every index tensor and mask is built once per forward; `attend` runs per layer and only writes, gathers and
    calls kernels, one per plan. On CUDA with flash-attn: one varlen call per mask kind. Elsewhere: the one-token
    rows of every kind in one plan (on CPU the fused `decode_kernel`, reading the pages in place among the other
    rows; else SDPA), and longer sequences grouped by query length, one SDPA call per group over gathered pages,
    with each sequence's own mask (so no row is padded to another's length; a lone sequence needs no padding).
    """

    cache: KVCache
    q_lens: list[int]
    k_lens: list[int]  # context length of each sequence *including* this forward's query tokens
    causal: list[bool]  # per sequence: causal mask, else bidirectional over cache + block
    block_tables: list[list[int]]
    draft_lora: bool | slice | torch.Tensor = False  # rows whose o_proj adds the draft adapter (see LoRALinear)
    use_flash: bool = False
    # `FusedCpuOps.decode_attention`: one-token rows read from their pages in place; None = gather + SDPA
    decode_kernel: Callable[..., torch.Tensor] | None = None
    positions: torch.Tensor = field(init=False)  # [T] int64, position of every query token
    slot_mapping: torch.Tensor = field(init=False)  # [T] int64, cache slot of every query token
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
        starts = q_start.tolist()
        if self.use_flash:
            for kind in (False, True):  # one varlen call per mask kind (flash-attn's causal is bottom-right aligned)
                part = [i for i in range(b) if self.causal[i] == kind]
                if part:
                    self._plans.append(self._flash_plan(part, tables, starts))
            return
        by_len: dict[int, list[int]] = {}  # query length -> sequences (one-token rows: any mask, one plan)
        for i in range(b):
            by_len.setdefault(self.q_lens[i], []).append(i)
        for q_len, part in by_len.items():
            if q_len == 1 and self.decode_kernel is not None:
                idx = torch.tensor(part)
                self._plans.append(dict(path="decode_kernel", tables=tables[idx].to(device),
                                        lens=k_lens[idx].to(device), seq_rows=q_start[idx].to(device)))
                continue
            plan = self._plan(part, tables)
            plan["rows"] = self._rows(part, starts, b)
            self._plans.append(plan)

    def _rows(self, part: list[int], starts: list[int], b: int) -> slice | torch.Tensor | None:
        """The flat query rows of the sequences `part`: None for all of them, a slice when contiguous."""
        if len(part) == b:
            return None
        lo, hi = starts[part[0]], starts[part[-1]] + self.q_lens[part[-1]]
        if hi - lo == sum(self.q_lens[i] for i in part):
            return slice(lo, hi)
        return torch.cat([torch.arange(starts[i], starts[i] + self.q_lens[i]) for i in part]).to(self.cache.k.device)

    def _flash_plan(self, part: list[int], tables: torch.Tensor, starts: list[int]) -> dict:
        device = self.cache.k.device
        zero = torch.zeros(1, dtype=torch.long)
        q_lens, k_lens = torch.tensor([self.q_lens[i] for i in part]), torch.tensor([self.k_lens[i] for i in part])
        return dict(path="flash", causal=self.causal[part[0]], rows=self._rows(part, starts, len(self.q_lens)),
                    tables=tables[torch.tensor(part)].to(device, torch.int32),
                    cu_q=torch.cat([zero, q_lens.cumsum(0)]).to(device, torch.int32),
                    cu_k=torch.cat([zero, k_lens.cumsum(0)]).to(device, torch.int32),
                    max_q=int(q_lens.max()), max_k=int(k_lens.max()))

    def _plan(self, part: list[int], all_tables: torch.Tensor) -> dict:
        """Gather indices, mask and SDPA path for the sequences `part` (their query rows, concatenated)."""
        device, dtype = self.cache.k.device, self.cache.k.dtype
        bs = self.cache.block_size
        q_list, k_list = [self.q_lens[i] for i in part], [self.k_lens[i] for i in part]
        causal = [self.causal[i] for i in part]
        b, t = len(part), sum(q_list)
        q_lens, k_lens = torch.tensor(q_list), torch.tensor(k_list)
        q_start = q_lens.cumsum(0) - q_lens
        max_q, max_k = max(q_list), max(k_list)
        tables = all_tables[torch.tensor(part)]
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
        elif b == 1 and (not causal[0] or max_k == max_q):
            # a lone sequence, bidirectional over everything or a fresh causal prefill: no mask at all
            p.update(path="single", mask=None, is_causal=causal[0])
        else:
            q_off = torch.arange(max_q)
            q_valid = q_off[None, :] < q_lens[:, None]  # [B, max_q]
            q_pos = (k_lens - q_lens)[:, None] + q_off[None, :]  # [B, max_q]
            mask = k_valid[:, None, :].expand(b, max_q, max_k)
            if any(causal):  # causal sequences mask keys past each query; bidirectional ones only the padding
                future = key_pos[None, None, :] > q_pos[:, :, None]  # [B, max_q, max_k]
                mask = mask & ~(future & torch.tensor(causal)[:, None, None])
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
        out = None
        for p in self._plans:
            if p["path"] == "decode_kernel":  # reads its rows of q and writes its rows of `out`, in place
                if out is None:
                    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
                self.decode_kernel(q, flat_k, flat_v, p["tables"], p["lens"], self.cache.block_size, p["seq_rows"],
                                   out)
                continue
            rows = p["rows"]
            if p["path"] == "flash":
                part = flash_attn_varlen_func(q if rows is None else q[rows], self.cache.k[layer_idx],
                                              self.cache.v[layer_idx], p["cu_q"], p["cu_k"], p["max_q"], p["max_k"],
                                              causal=p["causal"], block_table=p["tables"])
            else:
                part = self._attend_plan(p, q if rows is None else q[rows], flat_k, flat_v)
            if rows is None:
                return part
            if out is None:
                out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            out[rows] = part
        assert out is not None
        return out

    def _attend_plan(self, p: dict, q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor) -> torch.Tensor:
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
