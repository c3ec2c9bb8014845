"""The pieces of a merged forward, unit by unit: attention over a ragged mix of masks (the CPU decode kernel and the
SDPA plans) against a naive per-sequence reference, and the draft LoRA applied to some rows only."""

import pytest
import torch
import torch.nn.functional as F

from engine.attention import KVCache, PagedContext
from engine.cpu_kernels import load_cpu_ops
from engine.model import LoRALinear

# (query rows, keys including them, causal): one-token rows of both kinds, blocks of both kinds over a cache (one
# length, so one padded plan with a per-sequence mask), a lone bidirectional block, fresh and cached prefill chunks
MIX = [(1, 9, True), (8, 20, False), (1, 5, False), (8, 20, True), (4, 4, False), (12, 12, True), (5, 33, True),
       (70, 70, True), (79, 110, True), (3, 17, False), (1, 40, True)]


def _setup(dtype: torch.dtype, bs: int = 16, hq: int = 4, hkv: int = 2, d: int = 24):
    g = torch.Generator().manual_seed(7)
    num_blocks = 64
    cache = KVCache.allocate(1, num_blocks, bs, hkv, d, dtype, torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for _, k_len, _ in MIX:
        need = -(-k_len // bs)
        tables.append([free.pop() for _ in range(need)])
    t = sum(q for q, _, _ in MIX)
    q = torch.randn(t, hq + 2 * hkv, d, generator=g).to(dtype)[:, :hq]  # a strided slice, as the model's q
    k = torch.randn(t, hkv, d, generator=g).to(dtype)
    v = torch.randn(t, hkv, d, generator=g).to(dtype)
    return cache, tables, q, k, v


def _reference(cache: KVCache, tables: list[list[int]], q: torch.Tensor) -> torch.Tensor:
    """Per sequence: its keys gathered in fp32, an explicit mask, SDPA (after the forward wrote its own K/V)."""
    bs, outs, row = cache.block_size, [], 0
    for (q_len, k_len, causal), table in zip(MIX, tables):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(k_len)])
        keys, vals = (c.float().transpose(0, 1)[None] for c in (cache.flat_k[0][slots], cache.flat_v[0][slots]))
        q_pos = torch.arange(k_len - q_len, k_len)
        allowed = (torch.arange(k_len)[None, :] <= q_pos[:, None]) if causal else torch.ones(q_len, k_len).bool()
        qs = q[row:row + q_len].float().transpose(0, 1)[None]  # [1, Hq, q_len, D]
        out = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=allowed[None, None], enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
        row += q_len
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", [True, False], ids=["decode-kernel", "sdpa"])
def test_one_forward_attends_each_sequence_with_its_own_mask(dtype, kernel):
    """One-token rows, causal and bidirectional blocks and prefill chunks in one context: every row equals
    attention of its own sequence alone with its own mask."""
    ops = load_cpu_ops()
    if kernel and ops is None:
        pytest.skip("the CPU kernels cannot be built here")
    cache, tables, q, k, v = _setup(dtype)
    ctx = PagedContext(cache, [m[0] for m in MIX], [m[1] for m in MIX], [m[2] for m in MIX], tables,
                       decode_kernel=ops.decode_attention if kernel else None)
    paths = [p["path"] for p in ctx._plans]
    assert sorted(paths) == sorted(["decode_kernel" if kernel else "decode", "padded"] + ["single"] * 6)
    out = ctx.attend(0, q, k, v)
    ref = _reference(cache, tables, q)
    # fp32: summation order only; bf16: the output's own rounding (the kernel and SDPA round once, at the end)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)


def test_a_sequence_gets_the_same_attention_bits_alone_and_in_a_ragged_mix():
    """What shares a forward does not change a sequence's attention rows (fp32, the CPU kernels' plans, bit for
    bit): the decode kernel reads each one-token row in place, and a lone query length is a lone SDPA call."""
    ops = load_cpu_ops()
    if ops is None:
        pytest.skip("the CPU kernels cannot be built here")
    cache, tables, q, k, v = _setup(torch.float32)
    starts = [sum(m[0] for m in MIX[:i]) for i in range(len(MIX))]
    merged = PagedContext(cache, [m[0] for m in MIX], [m[1] for m in MIX], [m[2] for m in MIX], tables,
                          decode_kernel=ops.decode_attention).attend(0, q, k, v)
    for i, (q_len, k_len, causal) in enumerate(MIX):
        if q_len == 8:
            continue  # these two share a padded plan (with each other only)
        rows = slice(starts[i], starts[i] + q_len)
        alone = PagedContext(cache, [q_len], [k_len], [causal], [tables[i]], decode_kernel=ops.decode_attention)
        assert torch.equal(alone.attend(0, q[rows], k[rows], v[rows]), merged[rows]), MIX[i]


def test_the_flash_plan_makes_one_varlen_call_per_mask_kind(monkeypatch):
    """The CUDA path's bookkeeping, checked on CPU against a stand-in for flash-attn's paged varlen kernel (the
    kernel itself needs a GPU): each mask kind's sequences go in one call with their own cu_seqlens and block
    tables, and the rows come back where they belong."""
    import engine.attention as attention

    calls = []

    def fake_flash(q, k_cache, v_cache, cu_q, cu_k, max_q, max_k, causal, block_table):
        # flash-attn's semantics: sequence i's queries are the last q_len of its k_len positions (bottom-right)
        bs, outs = k_cache.shape[1], []
        calls.append((causal, len(cu_q) - 1))
        for i in range(len(cu_q) - 1):
            qs = q[cu_q[i]:cu_q[i + 1]].float()
            q_len, k_len = int(cu_q[i + 1] - cu_q[i]), int(cu_k[i + 1] - cu_k[i])
            assert q_len <= max_q and k_len <= max_k
            pos = torch.arange(k_len)
            blocks = block_table[i].long()[pos // bs]
            keys, vals = (c[blocks, pos % bs].float().transpose(0, 1)[None] for c in (k_cache, v_cache))
            allowed = pos[None, :] <= (k_len - q_len + torch.arange(q_len))[:, None] if causal else None
            o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], keys, vals,
                                               attn_mask=None if allowed is None else allowed[None, None],
                                               enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(attention, "flash_attn_varlen_func", fake_flash)
    cache, tables, q, k, v = _setup(torch.float32)
    ctx = PagedContext(cache, [m[0] for m in MIX], [m[1] for m in MIX], [m[2] for m in MIX], tables,
                       use_flash=True)
    out = ctx.attend(0, q, k, v)
    assert sorted(calls) == [(False, sum(not m[2] for m in MIX)), (True, sum(m[2] for m in MIX))]
    torch.testing.assert_close(out, _reference(cache, tables, q), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("rows", [slice(2, 5), torch.tensor([0, 3, 4])], ids=["range", "index"])
def test_the_draft_lora_changes_only_the_rows_that_asked_for_it(rows):
    torch.manual_seed(0)
    lin = LoRALinear(6, 5)
    lin.set_lora(torch.randn(2, 6), torch.randn(5, 2), 4.0)
    x = torch.randn(7, 6)
    with torch.inference_mode():
        plain, full, mixed = lin.forward_lora(x, False), lin.forward_lora(x, True), lin.forward_lora(x, rows)
    picked = torch.zeros(7, dtype=torch.bool)
    picked[rows] = True
    assert not torch.equal(plain, full)
    torch.testing.assert_close(mixed[picked], full[picked], atol=1e-6, rtol=1e-6)
    assert torch.equal(mixed[~picked], plain[~picked])
