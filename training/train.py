"""Base training of trimode-tiny: `L = L_AR + 0.3 * L_diff` with the block-diffusion mask, on CPU.

Resumable: `--out` holds `ckpt.pt` (model, optimiser, step, RNG state), written every `--ckpt-every` steps and at
the end; rerunning the same command continues from it. Curves go to `--out/log.jsonl`, the final model (bf16,
Hugging Face layout, tokenizer included) to `--out/final`.

    python -m training.train --tokenizer training/runs/tok4096 --out training/runs/base --steps 3000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engine.loader import save_checkpoint
from engine.model import TriModeModel
from engine.model_config import ModelConfig
from training.blockdiff import ar_nll, hybrid_loss
from training.corpus import DATA_DIR, read_docs
from training.tokenizer import BOS_ID, EOS_ID, IM_END_ID, MASK_ID

CHAT_FRACTION = 0.1  # share of training documents wrapped as a ChatML "continue this" exchange


def raw_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, block: int,
               max_pos: int = 2048) -> dict:
    """config.json of trimode-tiny (NLD layout)."""
    return {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": max_pos,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": [IM_END_ID, EOS_ID],
        "mask_token_id": MASK_ID,
        "block_size": block,
        "dlm_paradigm": "bidirectional",
        "ar_loss_weight": 1.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "torch_dtype": "bfloat16",
        "use_cache": False,
    }


def _chat_wrap(doc: str) -> str:
    lines = doc.split("\n")
    head, i = "", 0
    while i < len(lines) and len(head) < 160:
        head += lines[i] + "\n"
        i += 1
    rest = "\n".join(lines[i:])[:1500]
    return (f"<|im_start|>user\n{head.rstrip()}<|im_end|>\n<|im_start|>assistant\n{rest.strip()}<|im_end|>\n")


def encode_split(tokenizer_dir: Path, split: str, data_dir: Path = DATA_DIR, chat: bool = True) -> np.ndarray:
    """All documents of a split as one uint16 stream: `<s> doc </s>` (some ChatML-wrapped); cached on disk."""
    from tokenizers import Tokenizer

    tok_json = tokenizer_dir / "tokenizer.json"
    src = data_dir / f"{split}.txt"
    key = hashlib.sha256(tok_json.read_bytes() + src.read_bytes() + str(chat).encode()).hexdigest()[:12]
    cache = data_dir / f"{split}_{key}.npy"
    if cache.exists():
        return np.load(cache)
    tok = Tokenizer.from_file(str(tok_json))
    docs = read_docs(src)
    texts = []
    for d in docs:
        h = int.from_bytes(hashlib.sha256(d[:200].encode()).digest()[:4], "big") / 2**32
        texts.append(_chat_wrap(d) if chat and h < CHAT_FRACTION else d)
    out: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out += [BOS_ID, *enc.ids, EOS_ID]
    arr = np.asarray(out, dtype=np.uint16)
    np.save(cache, arr)
    return arr


def init_weights(model: TriModeModel, layers: int, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.normal_(0.0, std)


def val_batches(val: np.ndarray, n: int, max_batches: int = 8, batch: int = 16) -> list[torch.Tensor]:
    """Contiguous non-overlapping windows of the validation stream (fixed: same for every run)."""
    count = min(len(val) // n, max_batches * batch)
    w = torch.from_numpy(val[: count * n].astype(np.int64)).view(count, n)
    return list(w.split(batch))


@torch.no_grad()
def evaluate(model: TriModeModel, batches: list[torch.Tensor], block: int, autocast: bool) -> dict:
    """Validation AR perplexity (causal) and diffusion loss (fixed corruption seed)."""
    model.eval()
    tot, cnt, dsum = 0.0, 0, 0.0
    gen = torch.Generator().manual_seed(1234)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for x in batches:
            s, c = ar_nll(model, x)
            tot, cnt = tot + s, cnt + c
            _, _, d = hybrid_loss(model, x, MASK_ID, block, gen=gen)
            dsum += float(d)
    model.train()
    return {"val_ppl": math.exp(tot / cnt), "val_ar": tot / cnt, "val_diff": dsum / len(batches)}


def lr_at(step: int, total: int, peak: float, warmup: int, decay: int, floor: float = 0.1) -> float:
    """Warmup-stable-decay: linear warmup, constant, then linear decay to `floor * peak` over the last `decay`
    steps. A run may be shortened (rerun with a smaller `--steps`) while it is still before the decay phase."""
    if step < warmup:
        return peak * (step + 1) / warmup
    start = total - decay
    if step < start:
        return peak
    return peak * (1 - (1 - floor) * min(1.0, (step - start + 1) / decay))


def export(model: TriModeModel, raw: dict, tokenizer_dir: Path, out: Path) -> None:
    """Hugging Face layout in bf16: config, weights, tokenizer, generation_config."""
    save_checkpoint(model, out, raw, dtype=torch.bfloat16)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    gen = {"bos_token_id": BOS_ID, "eos_token_id": [IM_END_ID, EOS_ID], "pad_token_id": EOS_ID}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay", type=int, default=250, help="steps of linear LR decay at the end")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-autocast", action="store_true")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--bench", type=int, default=0, help="only time this many steps, then exit")
    ap.add_argument("--export-to", type=Path, default=None, help="export the current ckpt.pt there and exit")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    autocast = not args.no_autocast
    vocab = json.loads((args.tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    raw = raw_config(len(vocab), args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate,
                     args.block_size)
    cfg = ModelConfig.from_dict(raw)
    model = TriModeModel(cfg)
    init_weights(model, args.layers, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    train = encode_split(args.tokenizer, "train")
    val = encode_split(args.tokenizer, "val")
    vb = val_batches(val, args.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "ckpt.pt"
    step, rng_gen, elapsed0 = 0, torch.Generator().manual_seed(args.seed), 0.0
    pyrng = random.Random(args.seed)
    if ckpt_path.exists() and not args.bench:
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        rng_gen.set_state(ck["gen"])
        pyrng.setstate(ck["pyrng"])
        elapsed0 = ck.get("elapsed", 0.0)
        print(f"resumed at step {step}")
    elif args.export_to is not None:
        raise SystemExit(f"no checkpoint at {ckpt_path}")
    if args.export_to is not None:
        export(model, raw, args.tokenizer, args.export_to)
        print(f"exported step {step} to {args.export_to}")
        return
    (args.out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (args.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2) + "\n")
    print(f"params {n_params / 1e6:.2f}M, train tokens {len(train) / 1e6:.2f}M, "
          f"val tokens {len(val) / 1e6:.3f}M")

    def save() -> None:
        tmp = args.out / "ckpt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "gen": rng_gen.get_state(), "pyrng": pyrng.getstate(),
                    "elapsed": time.time() - t0}, tmp)
        tmp.replace(ckpt_path)

    log = open(args.out / "log.jsonl", "a")
    total = args.bench or args.steps
    n = args.seq_len
    model.train()
    bar = tqdm(total=total, initial=step, dynamic_ncols=True, mininterval=5)
    t0, tok_window, t_window = time.time() - elapsed0, 0, time.time()  # elapsed_s counts across resumes
    while step < total:
        starts = [pyrng.randrange(0, len(train) - n) for _ in range(args.batch)]
        x = torch.from_numpy(np.stack([train[s:s + n] for s in starts]).astype(np.int64))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup, args.decay)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, ar, diff = hybrid_loss(model, x, MASK_ID, args.block_size, args.alpha, gen=rng_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tok_window += x.numel()
        bar.update(1)
        if step % 10 == 0 or step == total:
            tps = tok_window / (time.time() - t_window)
            tok_window, t_window = 0, time.time()
            rec = {"step": step, "tokens": step * x.numel(), "loss": float(loss.detach()), "ar": float(ar),
                   "diff": float(diff), "lr": opt.param_groups[0]["lr"], "gnorm": float(gnorm),
                   "tok_s": round(tps), "elapsed_s": round(time.time() - t0, 1)}
            bar.set_postfix(ar=f"{float(ar):.3f}", diff=f"{float(diff):.3f}", tok_s=round(tps))
            if not args.bench and (step % args.eval_every == 0 or step == total):
                rec.update(evaluate(model, vb, args.block_size, autocast))
                bar.write(json.dumps(rec))
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if not args.bench and (step % args.ckpt_every == 0 or step == total):
            save()
    bar.close()
    if args.bench:
        print(f"bench: {args.bench * args.batch * n / (time.time() - t0):.0f} tok/s")
        return
    export(model, raw, args.tokenizer, args.out / "final")
    print(f"exported {args.out / 'final'}")


if __name__ == "__main__":
    main()
