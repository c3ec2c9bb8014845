"""The fused CPU kernels equal the eager ops they replace (engine/cpu_kernels.py), and the runner falls back to
the eager ops when they cannot be built."""

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels
from engine.config import EngineConfig
from engine.cpu_kernels import TORCH_OPS, load_cpu_ops
from engine.decoding.modes import MODES
from engine.llm import LLM
from engine.sequence import SamplingParams

DTYPES = [torch.float32, torch.bfloat16]


def _fused():
    if shutil.which("c++") is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or ninja on PATH: the CPU kernels cannot be built here")
    ops = load_cpu_ops()
    assert ops is not None, "a compiler and ninja are on PATH, so the CPU kernels must build"
    return ops


def _close(dtype: torch.dtype) -> dict:
    # bf16: at most a unit in the last place apart (fp32 sums in another order can round the other way)
    return dict(rtol=2**-7, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,hidden", [(1, 24), (7, 64), (64, 576)])
def test_rms_norm_with_and_without_residual(dtype, rows, hidden):
    ops = _fused()
    g = torch.Generator().manual_seed(rows * hidden)
    x, r = ((torch.randn(rows, hidden, generator=g) * 4).to(dtype) for _ in range(2))
    w = torch.rand(hidden, generator=g).to(dtype) + 0.5
    for residual in (None, r):
        out, res = ops.rms_norm(x, residual, w, 1e-5)
        ref, ref_res = TORCH_OPS.rms_norm(x, residual, w, 1e-5)
        assert out.dtype == dtype and res.dtype == dtype
        assert torch.equal(res, ref_res)  # the residual add is the eager add, bit for bit
        torch.testing.assert_close(out, ref, **_close(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,heads,total,head_dim", [(1, 3, 4, 24), (5, 12, 15, 64), (33, 6, 8, 128)])
def test_rope_is_bit_equal_on_a_strided_qkv(dtype, rows, heads, total, head_dim):
    ops = _fused()
    g = torch.Generator().manual_seed(heads * head_dim)
    wide = torch.randn(rows, total * head_dim + 5, generator=g).to(dtype)
    qkv = wide[:, :total * head_dim]  # rows strided as a slice of a wider output
    angle = torch.rand(rows, head_dim // 2, generator=g) * 100
    cos = torch.cat([angle.cos()] * 2, -1).to(dtype)[:, None]
    sin = torch.cat([-angle.sin(), angle.sin()], -1).to(dtype)[:, None]
    out = ops.rope(qkv, cos, sin, heads)
    assert out.shape == (rows, heads, head_dim)
    assert torch.equal(out, TORCH_OPS.rope(qkv, cos, sin, heads))  # same roundings, no FMA contraction


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_silu_mul_including_saturation_and_nan(dtype):
    ops = _fused()
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(9, 2 * 100, generator=g) * 6).to(dtype)
    gate_up[0, :6] = torch.tensor([-1e4, -100.0, -88.0, 88.0, 100.0, 1e4]).to(dtype)
    gate_up[1, 0] = float("nan")
    out, ref = ops.silu_mul(gate_up), TORCH_OPS.silu_mul(gate_up)
    assert out.shape == ref.shape == (9, 100)
    assert torch.isnan(out[1, 0]) and torch.isnan(ref[1, 0])
    out[1, 0] = ref[1, 0] = 0
    # exp is a polynomial here and Sleef's in torch: a few fp32 ulps, below the tensor's own rounding in bf16
    close = _close(dtype) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(out, ref, **close)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("hq,hkv,head_dim,bs", [(4, 2, 24, 16), (9, 3, 64, 16), (4, 4, 128, 16), (8, 2, 64, 5)])
def test_decode_attention_reads_pages_in_place_like_gather_and_sdpa(dtype, hq, hkv, head_dim, bs):
    ops = _fused()
    g = torch.Generator().manual_seed(hq * head_dim)
    num_blocks = 64 * 16 // bs
    lens = torch.tensor([1, 15, 16, 17, 40, 100])  # one key, page edges, several pages
    b = len(lens)
    k_cache, v_cache = ((torch.randn(num_blocks * bs, hkv, head_dim, generator=g)).to(dtype) for _ in range(2))
    max_blocks = int((lens.max() + bs - 1) // bs)
    tables = torch.randperm(num_blocks, generator=g)[:b * max_blocks].view(b, max_blocks).contiguous()
    q = (torch.randn(b, hq + 3, head_dim, generator=g) * 2).to(dtype)[:, :hq]  # a strided slice, as in the model
    out = ops.decode_attention(q, k_cache, v_cache, tables, lens, bs)
    assert out.shape == (b, hq, head_dim) and out.dtype == dtype
    for i in range(b):  # reference in fp32: gather this sequence's keys, SDPA with GQA
        n = int(lens[i])
        slots = tables[i, torch.arange(n) // bs] * bs + torch.arange(n) % bs
        keys, vals = (c[slots].float().transpose(0, 1)[None] for c in (k_cache, v_cache))  # [1, Hkv, n, D]
        ref = F.scaled_dot_product_attention(q[i].float()[None, :, None], keys, vals, enable_gqa=hq != hkv)
        torch.testing.assert_close(out[i].float(), ref[0, :, 0], **_close(dtype), msg=f"sequence {i}")


def test_engine_outputs_equal_with_fused_kernels_and_torch_ops(tiny_ckpt):
    """Every mode, mixed prefill and decode batches: the same greedy tokens from both op sets (fp32)."""
    _fused()
    llms = {ops: LLM(model=str(tiny_ckpt), num_kv_tokens=4096, max_num_seqs=8, cpu_kernels=ops)
            for ops in ("fused", "torch")}
    assert llms["fused"].engine.runner.ops.name == "fused" and llms["torch"].engine.runner.ops.name == "torch"
    prompts = [[5 + (i * 7 + j) % 80 for j in range(3 + 9 * i)] for i in range(6)]
    for mode in MODES:
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, mode=mode)
        fused, torch_ops = (llms[k].generate(prompts, params) for k in ("fused", "torch"))
        assert [o.token_ids for o in fused] == [o.token_ids for o in torch_ops], mode


def test_runner_falls_back_to_torch_ops_without_a_compiler(tiny_ckpt, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="trimode.engine"):
        llm = LLM(model=str(tiny_ckpt), num_kv_tokens=1024, cpu_kernels="auto")
    assert llm.engine.runner.ops is TORCH_OPS
    assert "CPU kernels unavailable" in caplog.text
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    with pytest.raises(RuntimeError, match="cpu_kernels='fused'"):
        LLM(model=str(tiny_ckpt), num_kv_tokens=1024, cpu_kernels="fused")


def test_cpu_kernels_setting_is_checked():
    with pytest.raises(ValueError, match="cpu_kernels"):
        EngineConfig(cpu_kernels="fast")


def test_bench_kernels_prints_every_op(capsys):
    _fused()
    from bench.kernels import main

    main(["--rows", "2", "--context", "20", "--repeats", "1", "--cache-mib", "4", "--dtype", "float32"])
    table = capsys.readouterr().out
    for op in ("rms_norm + residual, 2 rows", "rope (q and k), 1024 rows", "silu(gate) * up", "decode attention"):
        assert op in table
    assert table.count("x |") == 7  # a speed-up per row
