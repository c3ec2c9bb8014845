"""The block-diffusion training objective: the fast contexts equal the literal 2N x 2N `block_diff` mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import TriModeModel
from engine.model_config import ModelConfig
from tests.checkpoints import nld_raw_config
from training.blockdiff import (
    BlockDiffContext,
    DenseMaskContext,
    PrefixContext,
    corrupt,
    dense_block_diff_mask,
    hybrid_loss,
)

MASK = 3


def tiny_model() -> TriModeModel:
    torch.manual_seed(0)
    raw = nld_raw_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return TriModeModel(ModelConfig.from_dict(raw)).double()


def test_dense_mask_parts() -> None:
    n, blk = 8, 4
    m = dense_block_diff_mask(n, blk)
    # noisy -> noisy: block diagonal
    assert m[1, 3] and m[3, 0] and not m[3, 4] and m[5, 7]
    # noisy -> clean: strictly earlier blocks only
    assert not m[0, n + 0] and not m[3, n + 3] and m[4, n + 3] and not m[4, n + 4]
    # clean -> clean causal, clean never sees noisy
    assert m[n + 5, n + 5] and m[n + 5, n + 0] and not m[n + 5, n + 6] and not m[n:, :n].any()


@pytest.mark.parametrize("n,blk", [(16, 4), (12, 4), (16, 16)])
def test_blockdiff_context_equals_dense(n: int, blk: int) -> None:
    model = tiny_model()
    b = 3
    x0 = torch.randint(6, 96, (b, n))
    xt, _ = corrupt(x0, MASK, gen=torch.Generator().manual_seed(1))
    ids, pos = torch.stack([xt, x0], 1).reshape(-1), torch.arange(n).repeat(2 * b)
    fast = model(ids, pos, BlockDiffContext(b, n, blk))
    dense = model(ids, pos, DenseMaskContext(b, dense_block_diff_mask(n, blk)))
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-10)
    # distillation's two-pass form gives the same noisy-half states
    ctx = PrefixContext(b, n, blk)
    clean = model(x0.reshape(-1), torch.arange(n).repeat(b), ctx)
    ctx.capture = False
    noisy = model(xt.reshape(-1), torch.arange(n).repeat(b), ctx)
    d = dense.view(b, 2, n, -1)
    torch.testing.assert_close(noisy.view(b, n, -1), d[:, 0], rtol=0, atol=1e-10)
    torch.testing.assert_close(clean.view(b, n, -1), d[:, 1], rtol=0, atol=1e-10)


def test_hybrid_loss_matches_reference() -> None:
    model = tiny_model()
    b, n, blk, alpha = 2, 16, 4, 0.3
    x0 = torch.randint(6, 96, (b, n))
    loss, ar, diff = hybrid_loss(model, x0, MASK, blk, alpha, gen=torch.Generator().manual_seed(5))
    xt, p = corrupt(x0, MASK, gen=torch.Generator().manual_seed(5))
    ids, pos = torch.stack([xt, x0], 1).reshape(-1), torch.arange(n).repeat(2 * b)
    logits = model.logits(model(ids, pos, DenseMaskContext(b, dense_block_diff_mask(n, blk)))).view(b, 2, n, -1)
    ref_ar = F.cross_entropy(logits[:, 1, :-1].reshape(-1, logits.shape[-1]), x0[:, 1:].reshape(-1))
    m = xt == MASK
    ce = F.cross_entropy(logits[:, 0][m], x0[m], reduction="none")
    ref_diff = (ce / p.expand(b, n)[m]).sum() / m.sum()
    torch.testing.assert_close(ar, ref_ar.detach())
    torch.testing.assert_close(diff, ref_diff.detach())
    torch.testing.assert_close(loss, ref_ar + alpha * ref_diff)


def test_clean_half_is_plain_causal() -> None:
    """The clean half equals an ordinary causal forward: the AR path is what inference runs."""
    model = tiny_model()
    b, n = 2, 12
    x0 = torch.randint(6, 96, (b, n))
    xt = torch.full_like(x0, MASK)
    h = model(torch.stack([xt, x0], 1).reshape(-1), torch.arange(n).repeat(2 * b), BlockDiffContext(b, n, 4))
    causal = model(x0.reshape(-1), torch.arange(n).repeat(b), BlockDiffContext(b, n, 4, noisy=False))
    torch.testing.assert_close(h.view(b, 2, n, -1)[:, 1], causal.view(b, n, -1), rtol=0, atol=1e-10)


def test_corrupt_keep_first() -> None:
    x0 = torch.randint(6, 96, (64, 32))
    xt, p = corrupt(x0, MASK, gen=torch.Generator().manual_seed(0), keep_first=True, block=8, t_min=0.99)
    assert (xt[:, ::8] == x0[:, ::8]).all()
    assert (p > 0.98).all() and (xt == MASK).float().mean() > 0.8


def test_sampler_greedy_equals_engine(tmp_path) -> None:
    """Distillation data come from `training.sampler`; its greedy output is the engine's greedy AR output."""
    from engine.llm import LLM
    from engine.loader import load_model
    from engine.sequence import SamplingParams
    from tests.checkpoints import write_nld_checkpoint
    from training.sampler import generate

    path = write_nld_checkpoint(tmp_path / "ckpt")
    model, _ = load_model(path)
    prompts = torch.randint(6, 96, (3, 7), generator=torch.Generator().manual_seed(0))
    ours = generate(model, prompts, 12, torch.zeros(3), torch.ones(3), torch.Generator().manual_seed(0), MASK)
    outs = LLM(model=str(path)).generate(prompts.tolist(), SamplingParams(max_tokens=12, ignore_eos=True,
                                                                           mode="ar"))
    assert [o.token_ids for o in outs] == ours.tolist()
