"""`python -m bench.linear`: the CPU linear kernels side by side on a model's weight shapes, cold.

A decode forward streams every weight matrix from DRAM once, so each kernel is timed over enough distinct copies
of a shape to overflow the last-level cache (`--mib`, default 640 MiB) and reported as microseconds per call
and the weight bytes read per second. Kernels: `F.linear` over nn.Linear's row-major weight, over the column-major
layout (the MKL fallback of `engine.cpu_linear`), and over oneDNN-packed weights (what the runner uses on CPU).
A plain streaming read (`sum`) of the same bytes gives the memory bandwidth ceiling. One thread by default.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.cpu_linear import onednn_can_pack, pack_weight, packed_linear

# SmolLM2-135M: hidden 576, 3 KV heads of 64, MLP 1536, vocabulary 49152 (the LM head)
SMOLLM2_SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536),
                  "lm_head": (49152, 576)}


def _cold(fn: Callable[[torch.Tensor], torch.Tensor], weights: list, repeats: int) -> float:
    """Best-of-`repeats` seconds per call, each round touching every copy once."""
    for w in weights[:2]:
        fn(w)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for w in weights:
            fn(w)
        best = min(best, (time.perf_counter() - t) / len(weights))
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.linear", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,16,64", help="comma list of M (tokens in the forward)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mib", type=int, default=640, help="weight bytes per shape and kernel (beyond the LLC)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    packable = onednn_can_pack(dtype)
    print("| shape (out x in) | M | F.linear row-major | F.linear column-major | oneDNN packed | streaming read |"
          "\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (out_f, in_f) in SMOLLM2_SHAPES.items():
            nbytes = out_f * in_f * torch.tensor([], dtype=dtype).element_size()
            copies = max(2, args.mib * 2**20 // nbytes)
            rows = torch.randn(copies, out_f, in_f // 8).to(dtype)  # cheap distinct weights: tile random columns
            weights = [rows[i].repeat(1, 8).contiguous() for i in range(copies)]
            del rows
            stream = _cold(lambda w: w.sum(), weights, args.repeats)
            cols = [w.t().contiguous().t() for w in weights]
            packed = [pack_weight(w) for w in weights] if packable else []
            for m in (int(x) for x in args.rows.split(",")):
                x = torch.randn(m, in_f).to(dtype)
                cells = [_cold(lambda w, x=x: F.linear(x, w), weights, args.repeats),
                         _cold(lambda w, x=x: F.linear(x, w), cols, args.repeats),
                         _cold(lambda w, x=x: packed_linear(x, w), packed, args.repeats) if packable else float("nan")]
                shown = [f"{s * 1e6:.0f} us, {nbytes / s / 1e9:.1f} GB/s" for s in cells]
                print(f"| {name} {out_f}x{in_f} | {m} | {' | '.join(shown)} | "
                      f"{stream * 1e6:.0f} us, {nbytes / stream / 1e9:.1f} GB/s |", flush=True)
            del weights, cols, packed


if __name__ == "__main__":
    main()
