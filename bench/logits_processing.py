"""Cost of the sampling controls' logits processing per call (CPU, one thread): rows of a 49k vocabulary, a
300-token prompt and 100 output tokens, each control alone and all together, against a request that sets none.

    PYTHONPATH=. python bench/logits_processing.py [--vocab 49152] [--iters 200]

Figures are wall-clock per `process()` call; shared CI cores make them noisy.
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.logits_processing import build_pipeline, process
from engine.sequence import SamplingParams, Sequence

CASES = {
    "none": {},
    "presence+frequency": {"presence_penalty": 0.5, "frequency_penalty": 0.5},
    "repetition": {"repetition_penalty": 1.2},
    "logit_bias (10 ids)": {"logit_bias": tuple((i, 1.0) for i in range(10))},
    "min_tokens": {"min_tokens": 5},
    "all": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "min_tokens": 5,
            "bad_words_token_ids": ((5, 6), (7,)), "logit_bias": ((9, 1.0),)},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = torch.randn(8, args.vocab)
    print(f"{'controls':22s} {'1 row (us)':>12s} {'8 rows (us)':>12s}")
    for name, kw in CASES.items():
        params = SamplingParams(max_tokens=200, **kw)
        seq = Sequence("bench", list(range(100, 400)) + list(range(500, 600)), 300, params, frozenset({2}))
        seq.logits_pipeline = build_pipeline(params, stop_ids=[2], mask_id=3)
        cells = []
        for n in (1, 8):
            prefixes = [tuple(range(600, 600 + i)) for i in range(n)]  # verify rows: drafts before each
            start = time.perf_counter()
            for _ in range(args.iters):
                process(rows[:n], seq, prefixes)
            cells.append((time.perf_counter() - start) / args.iters * 1e6)
        print(f"{name:22s} {cells[0]:12.1f} {cells[1]:12.1f}")


if __name__ == "__main__":
    main()
