"""Self-distillation of the draft LoRA (`linear_spec_lora/`, o_proj only) on the model's own AR continuations.

1. `generate`: continue random training-text prompts with the model's own AR decoding (`training/sampler.py`,
   batched; a mix of greedy and temperature/top-p sampling), saved as JSONL of token ids. Greedy rows equal the
   engine's greedy AR output; the engine's paged CPU path was too slow on the shared 2-core box for bulk data.
2. `train`: freeze the base weights and train a LoRA on every layer's o_proj with the diffusion objective on
   that text: per block the first token (the inference seed) stays clean, the others are masked (all of them for
   half the sequences, as in a self_spec draft; a uniform share for the rest, as in diffusion denoising), and the
   cross-entropy is taken at masked positions of generated text. The clean prefix runs once with the LoRA off and
   no grad (exactly what the causal verify/commit passes write at inference); only the noisy pass uses the LoRA.
   AR forwards never use the LoRA, so AR outputs and perplexity are unchanged.

    python -m training.distill generate --model training/runs/base/final --out training/runs/distill/gen.jsonl
    python -m training.distill train --model training/runs/base/final --data training/runs/distill/gen.jsonl \
        --out training/runs/distill
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.loader import load_model, save_draft_lora
from engine.model import TriModeModel
from training.blockdiff import PrefixContext, corrupt
from training.sampler import generate as sample_ar
from training.train import encode_split

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json")


def generate(model_dir: Path, tokenizer_dir: Path, out: Path, n: int, max_tokens: int, greedy_share: float,
             temperature: float, top_p: float, seed: int, batch: int) -> None:
    """Continue `n` random training windows (16..96 tokens, one length per batch) with AR decoding."""
    model, info = load_model(model_dir, dtype=torch.float32, load_lora=False)
    stops = set(info.stop_token_ids)
    train = encode_split(tokenizer_dir, "train")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, ntok = time.time(), 0
    with open(out, "w") as f:
        for _ in tqdm(range(0, n, batch), desc="generate", mininterval=5):
            plen = rng.randint(16, 96)
            starts = [rng.randrange(0, len(train) - plen) for _ in range(batch)]
            prompts = torch.from_numpy(np.stack([train[s:s + plen] for s in starts]).astype(np.int64))
            temps = torch.tensor([0.0 if rng.random() < greedy_share else temperature for _ in range(batch)])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs = sample_ar(model, prompts, max_tokens, temps, torch.full((batch,), top_p), gen,
                                 banned=info.config.mask_token_id)
            for p, tmp, o in zip(prompts.tolist(), temps.tolist(), outs.tolist()):
                cut = next((i + 1 for i, t in enumerate(o) if t in stops), len(o))
                f.write(json.dumps({"prompt": p, "output": o[:cut], "temperature": tmp}) + "\n")
                ntok += cut
    args = {"n": n, "max_tokens": max_tokens, "greedy_share": greedy_share, "temperature": temperature,
            "top_p": top_p, "gen_seed": seed, "generated_tokens": ntok, "gen_seconds": round(time.time() - t0)}
    (out.parent / "gen_args.json").write_text(json.dumps(args, indent=2) + "\n")
    print(f"generated {ntok} tokens in {time.time() - t0:.0f}s ({ntok / (time.time() - t0):.0f} tok/s)")


def load_stream(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All samples back to back: token ids and a weight of 1 on generated tokens, 0 on prompt tokens."""
    ids, w = [], []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        ids += r["prompt"] + r["output"]
        w += [0] * len(r["prompt"]) + [1] * len(r["output"])
    return np.asarray(ids, dtype=np.int64), np.asarray(w, dtype=np.float32)


def add_lora(model: TriModeModel, r: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """Fresh trainable o_proj adapters (A random, B zero: the draft starts as the base model)."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for layer in model.encoder.layers:
        o = layer.self_attn.o_proj
        a = torch.randn(r, o.in_features, generator=g) / math.sqrt(o.in_features)
        o.set_lora(a.requires_grad_(True), torch.zeros(o.out_features, r, requires_grad=True), alpha / r)
        params += [o.lora_A, o.lora_B]
    return params


def draft_loss(model: TriModeModel, x0: torch.Tensor, w: torch.Tensor, mask_id: int, block: int,
               full_share: float, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the LoRA draft at masked, weighted positions; returns (loss, masked-token accuracy)."""
    b, n = x0.shape
    pos = torch.arange(n).repeat(b)
    ctx = PrefixContext(b, n, block)
    with torch.no_grad():
        model(x0.reshape(-1), pos, ctx)  # clean causal pass, LoRA off: fills ctx.kv
    xt, _ = corrupt(x0, mask_id, gen=gen, keep_first=True, block=block)
    full = torch.rand(b, 1, generator=gen) < full_share
    seed_pos = (torch.arange(n) % block == 0)[None, :]
    xt = torch.where(full & ~seed_pos, torch.full_like(x0, mask_id), xt)
    ctx.capture, ctx.draft_lora = False, True
    h = model(xt.reshape(-1), pos, ctx).view(b, n, -1)
    sel = (xt == mask_id) & (w > 0)
    logits = model.logits(h[sel])
    ce = F.cross_entropy(logits, x0[sel], reduction="none")
    acc = float((logits.argmax(-1) == x0[sel]).float().mean()) if sel.any() else 0.0
    return (ce * w[sel]).sum() / w[sel].sum().clamp(min=1), acc


def train(model_dir: Path, data: Path, out: Path, r: int, alpha: float, steps: int, batch: int, seq_len: int,
          lr: float, full_share: float, seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model, info = load_model(model_dir, dtype=torch.float32, load_lora=False)
    cfg = info.config
    assert cfg.mask_token_id is not None
    params = add_lora(model, r, alpha, seed)
    model.train()
    ids, wts = load_stream(data)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    gen_args = data.parent / "gen_args.json"
    meta = json.loads(gen_args.read_text()) if gen_args.exists() else {}
    meta.update({"rank": r, "alpha": alpha, "steps": steps, "batch": batch, "seq_len": seq_len, "lr": lr,
                 "full_share": full_share, "seed": seed})
    (out / "distill_args.json").write_text(json.dumps(meta, indent=2) + "\n")
    log = open(out / "distill_log.jsonl", "w")
    bar = tqdm(range(steps), desc="distill", mininterval=5)
    t0 = time.time()
    for step in bar:
        starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(batch)]
        x = torch.from_numpy(np.stack([ids[s:s + seq_len] for s in starts]))
        w = torch.from_numpy(np.stack([wts[s:s + seq_len] for s in starts]))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, acc = draft_loss(model, x, w, cfg.mask_token_id, cfg.block_size, full_share, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{float(loss):.3f}", acc=f"{acc:.3f}")
        log.write(json.dumps({"step": step + 1, "loss": float(loss), "acc": acc,
                              "elapsed_s": round(time.time() - t0, 1)}) + "\n")
        log.flush()
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    for f in HF_FILES:
        shutil.copy(model_dir / f, final / f)
    # the LoRA is trained on denoising too, so the engine uses it there unless told otherwise
    cfg = json.loads((final / "config.json").read_text())
    cfg["trimode_diffusion_lora"] = True
    (final / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_draft_lora(model, final, r, alpha)
    print(f"wrote {final}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--model", type=Path, required=True)
    g.add_argument("--tokenizer", type=Path, default=None, help="default: --model")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--n", type=int, default=2048)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--greedy-share", type=float, default=0.6)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch", type=int, default=256)
    g.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("train")
    t.add_argument("--model", type=Path, required=True)
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--rank", type=int, default=128)
    t.add_argument("--alpha", type=float, default=256.0)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--full-share", type=float, default=0.7)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.cmd == "generate":
        torch.set_num_threads(args.threads)
        generate(args.model, args.tokenizer or args.model, args.out, args.n, args.max_tokens, args.greedy_share,
                 args.temperature, args.top_p, args.seed, args.batch)
    else:
        train(args.model, args.data, args.out, args.rank, args.alpha, args.steps, args.batch, args.seq_len,
              args.lr, args.full_share, args.seed, args.threads)


if __name__ == "__main__":
    main()
