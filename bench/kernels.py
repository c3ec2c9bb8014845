"""`python -m bench.kernels`: the model's glue ops, eager (`TorchOps`) against the fused CPU kernels.

Per op, at a decode batch (`--rows`, default 16) and a prefill chunk (1024 rows) of SmolLM2-135M's shapes: RMSNorm
with its residual add, RoPE over q and k, SwiGLU, and decode attention (gather + SDPA against the kernel that
reads the pages in place) with `--context` keys per sequence. Attention runs cold: each call reads another
layer's cache, as a decode step does, from a pool larger than the last-level cache (`--cache-mib`). Prints
microseconds per call (best of `--repeats` rounds). Then, with `--model`, one engine per op set runs the same
decode waves in turn and prints the median decode step. One thread by default.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.cpu_kernels import TORCH_OPS, load_cpu_ops

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 576, 9, 3, 64, 1536  # SmolLM2-135M


def _best(fn: Callable[[], object], calls: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def _glue_rows(rows: int, dtype: torch.dtype, repeats: int) -> list[tuple[str, float, float]]:
    fused = load_cpu_ops()
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(rows, HIDDEN, generator=g).to(dtype) for _ in range(2))
    w = torch.rand(HIDDEN, generator=g).to(dtype)
    qkv = torch.randn(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g).to(dtype)
    cos, sin = (torch.rand(rows, 1, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    gate_up = torch.randn(rows, 2 * INTER, generator=g).to(dtype)
    calls = max(3, 3000 // rows)
    out = []
    for name, call in (("rms_norm + residual", lambda ops: ops.rms_norm(x, r, w, 1e-5)),
                       ("rope (q and k)", lambda ops: ops.rope(qkv, cos, sin, HEADS + KV_HEADS)),
                       ("silu(gate) * up", lambda ops: ops.silu_mul(gate_up))):
        out.append((f"{name}, {rows} rows", _best(lambda c=call: c(TORCH_OPS), calls, repeats),
                    _best(lambda c=call: c(fused), calls, repeats)))
    return out


def _attention_row(batch: int, context: int, dtype: torch.dtype, repeats: int,
                   cache_mib: int) -> tuple[str, float, float]:
    fused = load_cpu_ops()
    g = torch.Generator().manual_seed(1)
    bs = 16
    blocks_per_layer = batch * ((context + bs - 1) // bs)
    layers = max(2, (cache_mib << 20) // (2 * blocks_per_layer * bs * KV_HEADS * HEAD_DIM * 4))
    pool = layers * blocks_per_layer
    k_cache, v_cache = (torch.randn(pool * bs, KV_HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    order = torch.randperm(pool, generator=g).view(layers, batch, -1)  # scattered pages, as a long-running pool
    lens = torch.full((batch,), context)
    q = torch.randn(batch, HEADS + KV_HEADS, HEAD_DIM, generator=g).to(dtype)[:, :HEADS]
    key_pos = torch.arange(context)
    state = {"layer": 0}

    def next_tables() -> torch.Tensor:
        state["layer"] = (state["layer"] + 1) % layers
        return order[state["layer"]].contiguous()

    def eager() -> torch.Tensor:
        tables = next_tables()
        idx = (tables[:, key_pos // bs] * bs + key_pos % bs).flatten()
        keys = k_cache.index_select(0, idx).view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
        vals = v_cache.index_select(0, idx).view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return F.scaled_dot_product_attention(q[:, :, None], keys, vals, enable_gqa=True)[:, :, 0]

    def kernel() -> torch.Tensor:
        return fused.decode_attention(q, k_cache, v_cache, next_tables(), lens, bs)

    calls = 4 * layers
    return (f"decode attention, {batch} x {context} keys, cold", _best(eager, calls, repeats),
            _best(kernel, calls, repeats))


def _engine_steps(model: str, dtype: str, rounds: int) -> dict[str, float]:
    from engine.llm import LLM
    from engine.sequence import SamplingParams

    engines = {ops: LLM(model=model, dtype=dtype, num_threads=torch.get_num_threads(), cpu_kernels=ops).engine
               for ops in ("torch", "fused")}
    steps: dict[str, list[float]] = {k: [] for k in engines}
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    for rnd in range(rounds):
        for name, eng in engines.items():  # alternate, so load from other tenants hits both alike
            for i in range(16):
                eng.add_request(f"{rnd}-{i}", [(i * 7 + j * 13 + rnd) % 1000 + 100 for j in range(64)], params)
            eng.step()  # the prefill
            while eng.has_unfinished():
                t = time.perf_counter()
                eng.step()
                steps[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in steps.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rows", type=int, default=16, help="decode batch size")
    p.add_argument("--context", type=int, default=96, help="keys per sequence for decode attention")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache-mib", type=int, default=256, help="KV pool the attention calls cycle through")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="also time engine decode steps on this checkpoint (16 x 64 in)")
    p.add_argument("--rounds", type=int, default=4, help="alternating engine rounds with --model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if load_cpu_ops() is None:
        raise SystemExit("the CPU kernels could not be built here (see the warning above)")
    dtype = getattr(torch, args.dtype)
    rows = [*_glue_rows(args.rows, dtype, args.repeats), *_glue_rows(1024, dtype, args.repeats),
            _attention_row(args.rows, args.context, dtype, args.repeats, args.cache_mib)]
    print(f"| op ({args.dtype}, {args.threads} thread) | eager us | fused us | speed-up |")
    print("|---|---:|---:|---:|")
    for name, eager, fused in rows:
        print(f"| {name} | {eager:.1f} | {fused:.1f} | {eager / fused:.2f}x |")
    if args.model:
        ms = _engine_steps(args.model, args.dtype, args.rounds)
        print(f"\nengine decode step, batch 16, median of {args.rounds} alternating rounds: "
              f"torch ops {ms['torch']:.1f} ms, fused kernels {ms['fused']:.1f} ms ({ms['torch'] / ms['fused']:.2f}x)")


if __name__ == "__main__":
    main()
