"""CUDA path checks (`-m gpu`); skipped on machines without a GPU. The CPU fallback is tested everywhere."""

import dataclasses

import pytest
import torch

from engine import attention
from engine.llm import LLM
from engine.sequence import SamplingParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_path_imports_and_falls_back_on_cpu():
    assert attention.flash_available(torch.device("cpu"), 256) is False
    assert attention.flash_available(torch.device("cuda"), 16) is False  # flash-attn 2 paged needs 256-token pages


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["ar", "self_spec", "diffusion"])
def test_flash_attn_equals_sdpa_on_cuda(tiny_ckpt, mode):
    if attention.flash_attn_varlen_func is None:
        pytest.skip("flash-attn not installed")
    prompts = [[5 + i] * (3 + 5 * i) for i in range(6)]
    params = SamplingParams(max_tokens=24, mode=mode, ignore_eos=True)
    kw = dict(device="cuda", dtype="bfloat16", kv_block_size=256, gpu_memory_utilization=0.3)
    flash = LLM(model=str(tiny_ckpt), use_flash_attn=True, **kw)
    sdpa = LLM(model=str(tiny_ckpt), use_flash_attn=False, **kw)
    assert flash.engine.runner.use_flash and not sdpa.engine.runner.use_flash
    a = [o.token_ids for o in flash.generate(prompts, params)]
    b = [o.token_ids for o in sdpa.generate(prompts, params)]
    same = sum(x == y for x, y in zip(a, b))
    assert same >= len(a) - 1, f"flash and sdpa disagree on {len(a) - same} of {len(a)} prompts (bf16 numerics)"


@pytest.mark.gpu
@cuda
def test_greedy_self_spec_equals_ar_on_cuda(tiny_ckpt):
    llm = LLM(model=str(tiny_ckpt), device="cuda", dtype="float32", gpu_memory_utilization=0.3)
    prompts = [[7 + i] * (2 + 3 * i) for i in range(8)]
    ar = llm.generate(prompts, dataclasses.replace(SamplingParams(max_tokens=40, ignore_eos=True), mode="ar"))
    spec = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True, mode="self_spec"))
    assert [o.token_ids for o in spec] == [o.token_ids for o in ar]
