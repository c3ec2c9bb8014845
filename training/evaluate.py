"""Measure trimode-tiny's figures through the engine (greedy unless stated, held-out prompts, CPU fp32).

AR validation perplexity; per decoding mode: tokens per decode forward, perplexity of the output as scored by
AR mode, distinct-2 and the share of repeated 4-grams; self_spec mean accepted tokens per iteration and the
wall-clock speed-up over AR at one request; greedy self_spec == greedy AR. `quick` holds the cheap subset that
`tests/test_builtin_model.py` recomputes.

    python -m training.evaluate --model engine/builtin/trimode-tiny --out training/runs/eval.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from engine.llm import LLM, CompletionOutput
from engine.loader import load_model
from engine.model import TriModeModel
from engine.sequence import SamplingParams
from training.blockdiff import BlockDiffContext, ar_nll

PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "prompts.jsonl"


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def val_ppl(model: TriModeModel, val: np.ndarray, n: int = 256, windows: int = 128, batch: int = 16) -> float:
    """AR perplexity over the first `windows` contiguous windows of the validation stream."""
    count = min(len(val) // n, windows)
    x = torch.from_numpy(val[: count * n].astype(np.int64)).view(count, n)
    tot, cnt = 0.0, 0
    for xb in x.split(batch):
        s, c = ar_nll(model, xb)
        tot, cnt = tot + s, cnt + c
    return math.exp(tot / cnt)


@torch.no_grad()
def output_ppl(model: TriModeModel, outs: list[CompletionOutput]) -> float:
    """Perplexity of the generated tokens under the AR model, each conditioned on its prompt."""
    tot, cnt = 0.0, 0
    for o in outs:
        ids = torch.tensor(o.prompt_token_ids + o.token_ids)
        if len(o.token_ids) == 0:
            continue
        h = model(ids, torch.arange(len(ids)), BlockDiffContext(1, len(ids), 1, noisy=False))
        p = len(o.prompt_token_ids)
        logits = model.logits(h[p - 1:-1])
        tot += float(torch.nn.functional.cross_entropy(logits, ids[p:], reduction="sum"))
        cnt += len(o.token_ids)
    return math.exp(tot / max(cnt, 1))


def distinct2(outs: list[CompletionOutput]) -> float:
    vals = []
    for o in outs:
        bg = list(zip(o.token_ids, o.token_ids[1:]))
        if bg:
            vals.append(len(set(bg)) / len(bg))
    return float(np.mean(vals)) if vals else 0.0


def repeat4(outs: list[CompletionOutput]) -> float:
    """Share of 4-grams that already occurred earlier in the same output."""
    rep, tot = 0, 0
    for o in outs:
        seen: set[tuple[int, ...]] = set()
        t = o.token_ids
        for i in range(len(t) - 3):
            g = tuple(t[i:i + 4])
            rep += g in seen
            tot += 1
            seen.add(g)
    return rep / max(tot, 1)


def tokens_per_forward(outs: list[CompletionOutput]) -> float:
    return sum(len(o.token_ids) for o in outs) / max(1, sum(o.num_decode_forwards for o in outs))


def accepted_per_iteration(outs: list[CompletionOutput]) -> float:
    """self_spec: tokens emitted per draft+verify iteration (accepted drafts + the bonus token)."""
    return sum(len(o.token_ids) - 1 for o in outs) / max(1, sum(o.num_decode_forwards for o in outs) / 2)


def mode_figures(model: TriModeModel, outs: list[CompletionOutput]) -> dict:
    return {"tokens_per_forward": round(tokens_per_forward(outs), 3), "output_ppl": round(output_ppl(model, outs), 3),
            "distinct2": round(distinct2(outs), 4), "repeat4": round(repeat4(outs), 4),
            "mean_len": round(float(np.mean([len(o.token_ids) for o in outs])), 1)}


def speedup(llm: LLM, prompts: list[str], max_tokens: int, reps: int = 1) -> dict:
    """Wall-clock of one request at a time, AR vs self_spec, interleaved to share the machine's noise."""
    t = {"ar": 0.0, "self_spec": 0.0}
    n = {"ar": 0, "self_spec": 0}
    for _ in range(reps):
        for p in prompts:
            for mode in ("ar", "self_spec"):
                sp = SamplingParams(max_tokens=max_tokens, mode=mode, ignore_eos=True)
                t0 = time.perf_counter()
                o = llm.generate([p], sp)[0]
                t[mode] += time.perf_counter() - t0
                n[mode] += len(o.token_ids)
    return {"ar_tok_s": round(n["ar"] / t["ar"], 1), "self_spec_tok_s": round(n["self_spec"] / t["self_spec"], 1),
            "speedup": round((n["self_spec"] / t["self_spec"]) / (n["ar"] / t["ar"]), 3)}


def quick(model_dir: Path, model: TriModeModel, val: np.ndarray, prompts: list[str]) -> dict:
    """The cheap figures the unit test recomputes: 4 prompts, 64 tokens, greedy."""
    llm = LLM(model=str(model_dir), seed=0, diffusion_lora=False)  # the base recipe; LoRA denoise rows are separate
    ps = prompts[:4]
    ar = llm.generate(ps, SamplingParams(max_tokens=64, mode="ar", ignore_eos=True))
    spec = llm.generate(ps, SamplingParams(max_tokens=64, mode="self_spec", ignore_eos=True))
    diff = llm.generate(ps, SamplingParams(max_tokens=64, mode="diffusion", threshold=0.9, ignore_eos=True))
    return {"val_ppl_32": round(val_ppl(model, val, windows=32), 3),
            "self_spec_accepted": round(accepted_per_iteration(spec), 3),
            "diffusion_tpf_0.9": round(tokens_per_forward(diff), 3),
            "spec_equals_ar": all(a.token_ids == s.token_ids for a, s in zip(ar, spec))}


def evaluate(model_dir: Path, n_prompts: int, max_tokens: int, n_speed: int, threads: int) -> dict:
    from training.train import encode_split

    torch.set_num_threads(threads)
    model, info = load_model(model_dir, dtype=torch.float32, load_lora=False)
    val = encode_split(model_dir, "val")
    prompts = load_prompts()[:n_prompts]
    has_lora = (model_dir / "linear_spec_lora").is_dir()
    res: dict = {"model": str(model_dir), "has_draft_lora": has_lora, "n_prompts": len(prompts),
                 "max_tokens": max_tokens, "val_ppl": round(val_ppl(model, val), 3)}
    block = info.config.block_size
    g = lambda **kw: SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)
    runs = {
        "ar": g(mode="ar"),
        "self_spec": g(mode="self_spec"),
        "self_spec_t0.8": g(mode="self_spec", temperature=0.8, top_p=0.95, seed=0),
        "diffusion_th0.9": g(mode="diffusion", threshold=0.9),
        "diffusion_th0.7": g(mode="diffusion", threshold=0.7),
        **{f"diffusion_steps{s}": g(mode="diffusion", steps=s, threshold=1.0) for s in (1, 2, 4, 8)},
    }
    variants = [("", {})]
    if has_lora:
        variants.append(("lora:", {"diffusion_lora": True}))
    samples: dict = {}
    for prefix, kw in variants:
        llm = LLM(model=str(model_dir), seed=0, **kw)
        for name, sp in runs.items():
            if prefix and not name.startswith("diffusion"):
                continue
            t0 = time.time()
            outs = llm.generate(prompts, sp)
            fig = mode_figures(model, outs)
            if name.startswith("self_spec"):
                fig["accepted_per_iteration"] = round(accepted_per_iteration(outs), 3)
            fig["seconds"] = round(time.time() - t0, 1)
            res[prefix + name] = fig
            print(prefix + name, json.dumps(fig), flush=True)
            samples[prefix + name] = llm.tokenizer.decode(outs[0].token_ids[:64], skip_special_tokens=False)
            if name == "ar":
                ar_ids = [o.token_ids for o in outs]
            if name == "self_spec":
                res["self_spec_equals_ar"] = sum(a == o.token_ids for a, o in zip(ar_ids, outs))
        if not prefix:
            res["speed_one_request"] = speedup(llm, prompts[:n_speed], max_tokens)
            print("speed", json.dumps(res["speed_one_request"]), flush=True)
    res["block_size"] = block
    res["sample_prompt"] = prompts[0]
    res["samples"] = samples
    res["quick"] = quick(model_dir, model, val, load_prompts())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--speed-prompts", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    res = evaluate(args.model, args.prompts, args.max_tokens, args.speed_prompts, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main()
