"""Naive full-recompute decoders (no KV cache, batch 1), written straight from the reference algorithms.

They share only the model with the engine, so engine == reference checks the paged cache, the scheduler, the
masks and the rollback.
"""

from __future__ import annotations

import torch

from engine.attention import MaskedContext
from engine.model import TriModeModel


def _logits(model: TriModeModel, ids: list[int], num_causal: int, lora: bool = False) -> torch.Tensor:
    """Tokens [0, num_causal) causal; the rest see everything before them and each other (a block)."""
    t = len(ids)
    mask = torch.ones(t, t).tril().bool()
    mask[num_causal:, :] = True
    with torch.no_grad():
        h = model(torch.tensor(ids), torch.arange(t), MaskedContext(mask, draft_lora=lora))
        return model.logits(h)


def _argmax(logits: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    logits = logits.clone()
    if mask_id is not None:
        logits[..., mask_id] = float("-inf")
    return logits.argmax(-1)


def ar_greedy(model, prompt: list[int], max_tokens: int, mask_id=None) -> list[int]:
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(_argmax(_logits(model, ids, len(ids))[-1], mask_id)))
    return ids[len(prompt):]


def diffusion_greedy(model, prompt: list[int], max_tokens: int, block: int, steps: int, threshold, mask_id: int,
                     lora: bool = False) -> list[int]:
    """Reference `generate` with the AR seed (no stop handling: callers use ignore_eos)."""
    ids = list(prompt)
    seed = int(_argmax(_logits(model, ids, len(ids))[-1], mask_id))
    out: list[int] = []
    while len(out) < max_tokens:
        blk = [seed] + [mask_id] * (block - 1)
        done_steps = 0
        while mask_id in blk[1:]:
            lg = _logits(model, ids + blk, len(ids), lora)[len(ids):]
            masked = [i for i in range(1, block) if blk[i] == mask_id]
            probs = lg[masked].clone()
            probs[:, mask_id] = float("-inf")
            x0 = probs.argmax(-1)
            conf = probs.softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
            need = -(-len(masked) // (steps - done_steps))
            n = need if threshold is None or threshold >= 1.0 else max(1, need, int((conf >= threshold).sum()))
            for j in torch.argsort(conf, descending=True, stable=True)[:n].tolist():
                blk[masked[j]] = int(x0[j])
            done_steps += 1
        ids += blk
        out += blk  # the block starts with its seed
        seed = int(_argmax(_logits(model, ids, len(ids))[-1], mask_id))
    return out[:max_tokens]
