"""The block-diffusion training objective (`L = L_AR + alpha * L_diff`, reference section 5) on `TriModeModel`.

Each training sequence x0 of N tokens is fed as `[x_t (noisy, N) | x0 (clean, N)]`, both halves at positions
0..N-1. The 2N x 2N `block_diff` mask ORs (1) noisy -> noisy in the same block, (2) noisy -> clean in strictly
earlier blocks, (3) clean -> clean causal. `BlockDiffContext` never builds that dense mask: the clean half is a
plain causal SDPA over N keys, and only the noisy queries use one masked SDPA over the N clean + N noisy keys.
`DenseMaskContext` + `dense_block_diff_mask` are the literal reference (tests only).

`PrefixContext` serves distillation: the clean half runs once with the draft LoRA off and no grad
(`capture=True` stores its per-layer K/V), then the noisy half runs alone with the LoRA on, reading that K/V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.model import TriModeModel


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    # q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


def noisy_key_mask(n: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [N, 2N]: noisy query i sees clean key j iff block(j) < block(i), noisy key j iff same block."""
    b = torch.arange(n, device=device) // block
    to_clean = b[None, :] < b[:, None]
    to_noisy = b[None, :] == b[:, None]
    return torch.cat([to_clean, to_noisy], dim=1)


def dense_block_diff_mask(n: int, block: int) -> torch.Tensor:
    """The literal 2N x 2N `block_diff` mask over `[noisy | clean]` (True = may attend)."""
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    nk = noisy_key_mask(n, block)
    m[:n, n:] = nk[:, :n]
    m[:n, :n] = nk[:, n:]
    m[n:, n:] = torch.ones(n, n, dtype=torch.bool).tril()
    return m


@dataclass
class BlockDiffContext:
    """B sequences laid out flat as `[noisy_0 | clean_0 | noisy_1 | clean_1 | ...]`, each half N tokens.

    With `noisy=False` the input holds only the clean halves (`[clean_0 | clean_1 | ...]`): plain causal attention.
    """

    batch: int
    n: int
    block: int
    noisy: bool = True
    draft_lora: bool = False
    _mask: torch.Tensor | None = None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        halves = 2 if self.noisy else 1
        shape = lambda x: x.view(self.batch, halves * self.n, x.shape[1], x.shape[2]).transpose(1, 2)
        q4, k4, v4 = shape(q), shape(k), shape(v)  # [B, H, halves*N, D]
        if not self.noisy:
            out = _sdpa(q4, k4, v4, None, True)
        else:
            n = self.n
            clean = _sdpa(q4[:, :, n:], k4[:, :, n:], v4[:, :, n:], None, True)
            if self._mask is None:
                self._mask = noisy_key_mask(n, self.block, q.device)
            keys = torch.cat([k4[:, :, n:], k4[:, :, :n]], dim=2)  # [clean keys | noisy keys]
            vals = torch.cat([v4[:, :, n:], v4[:, :, :n]], dim=2)
            noisy = _sdpa(q4[:, :, :n], keys, vals, self._mask, False)
            out = torch.cat([noisy, clean], dim=2)
        return out.transpose(1, 2).reshape(q.shape)


@dataclass
class DenseMaskContext:
    """Reference: B sequences of 2N tokens with one explicit [2N, 2N] boolean mask."""

    batch: int
    mask: torch.Tensor
    draft_lora: bool = False

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.mask.shape[0]
        shape = lambda x: x.view(self.batch, s, x.shape[1], x.shape[2]).transpose(1, 2)
        out = _sdpa(shape(q), shape(k), shape(v), self.mask, False)
        return out.transpose(1, 2).reshape(q.shape)


@dataclass
class PrefixContext:
    """Distillation: `capture=True` runs the clean halves causally and keeps each layer's K/V; afterwards
    (`capture=False`) the input is the noisy halves only, attending to [earlier clean blocks | own noisy block]."""

    batch: int
    n: int
    block: int
    capture: bool = True
    draft_lora: bool = False
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _mask: torch.Tensor | None = None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        shape = lambda x: x.view(self.batch, self.n, x.shape[1], x.shape[2]).transpose(1, 2)
        q4, k4, v4 = shape(q), shape(k), shape(v)
        if self.capture:
            self.kv[layer_idx] = (k4.detach(), v4.detach())
            out = _sdpa(q4, k4, v4, None, True)
        else:
            if self._mask is None:
                self._mask = noisy_key_mask(self.n, self.block, q.device)
            kc, vc = self.kv[layer_idx]
            keys = torch.cat([kc.to(k4.dtype), k4], dim=2)
            vals = torch.cat([vc.to(v4.dtype), v4], dim=2)
            out = _sdpa(q4, keys, vals, self._mask, False)
        return out.transpose(1, 2).reshape(q.shape)


def corrupt(x0: torch.Tensor, mask_id: int, eps: float = 1e-3, gen: torch.Generator | None = None,
            keep_first: bool = False, block: int = 0, t_min: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token with probability p = (1 - eps) * t + eps, t ~ U(t_min, 1) per sequence.

    Returns (x_t, p [B, 1]). `keep_first` never masks the first token of each block (the inference seed).
    """
    b, n = x0.shape
    t = t_min + (1 - t_min) * torch.rand(b, 1, generator=gen)
    p = (1 - eps) * t + eps
    masked = torch.rand(b, n, generator=gen) < p
    if keep_first:
        masked[:, ::block] = False
    return torch.where(masked, torch.full_like(x0, mask_id), x0), p


def hybrid_loss(model: TriModeModel, x0: torch.Tensor, mask_id: int, block: int, alpha: float = 0.3,
                eps: float = 1e-3, gen: torch.Generator | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ar_loss, diff_loss) for a batch x0 [B, N] of clean token ids.

    AR: next-token cross-entropy on the clean half. Diffusion: cross-entropy at masked positions of the noisy
    half, divided by that sequence's p and normalised by the masked-token count. The head runs only on the
    positions that carry a loss.
    """
    b, n = x0.shape
    xt, p = corrupt(x0, mask_id, eps, gen)
    ids = torch.stack([xt, x0], dim=1).reshape(-1)  # [B * 2N]
    pos = torch.arange(n).repeat(2 * b)
    h = model(ids, pos, BlockDiffContext(b, n, block)).view(b, 2, n, -1)
    ar_logits = model.logits(h[:, 1, :-1].reshape(-1, h.shape[-1]))
    ar = F.cross_entropy(ar_logits, x0[:, 1:].reshape(-1))
    masked = xt == mask_id
    if masked.any():
        d_logits = model.logits(h[:, 0][masked])
        ce = F.cross_entropy(d_logits, x0[masked], reduction="none")
        diff = (ce / p.expand(b, n)[masked]).sum() / masked.sum()
    else:
        diff = h.new_zeros((), dtype=torch.float32)
    return ar + alpha * diff, ar.detach(), diff.detach()


@torch.no_grad()
def ar_nll(model: TriModeModel, x: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and token count of x [B, N] under plain causal attention."""
    b, n = x.shape
    h = model(x.reshape(-1), torch.arange(n).repeat(b), BlockDiffContext(b, n, 1, noisy=False)).view(b, n, -1)
    logits = model.logits(h[:, :-1].reshape(-1, h.shape[-1]))
    nll = F.cross_entropy(logits, x[:, 1:].reshape(-1), reduction="sum")
    return float(nll), b * (n - 1)
