"""`python -m bench.tensor_parallel`: forward times at tensor_parallel_size 1 vs 2 (or more), and the LM head choice.

Times every forward kind (`bench.forwards.time_forwards`: ar decode, self_spec draft / verify, diffusion denoise /
commit; median of `--repeats` rounds) through the real engine at each `--sizes` value, for each `--batch-sizes`
value, on `--model` or on a random NLD checkpoint of `--shape` written to a temporary directory. The ranks share
the CPUs this process may use (each rank gets its share as threads), so on a CPU TP=N runs the same FLOPs on the
same cores plus 2 all-reduces per layer over loopback gloo and N processes' overheads: expect it slower, not
faster. What TP buys is memory (each rank holds 1/N of the layers and KV) and, on GPUs, N devices' bandwidth.

`--head` also times the LM-head choice on two gloo ranks: replicated on rank 0 (one [rows, H] x [H, V] GEMM on all
the threads) vs vocab-parallel (each rank multiplies half the vocabulary, then rank 0 gathers [rows, V/2] from
the other), for the rows a decode step and a block forward need logits for.
CPU figures on a shared machine are noisy: run twice and compare.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.forwards import time_forwards
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_config import ModelConfig

# random NLD checkpoints: "cpu" keeps the bench to a few minutes on 2 cores; "8b" is the Nemotron-Labs-Diffusion-8B
# geometry for a GPU host (`--shape 8b --device cuda --dtype bfloat16 --sizes 1,2`: a 17 GB checkpoint on disk,
# 34 GB of host RAM while it is written; untested here, no GPU)
SHAPES = {
    "cpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=8, head_dim=64, vocab_size=32768),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=34, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=131072),
}


def write_random_checkpoint(path: Path, shape: dict, dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight NLD checkpoint with a draft LoRA (forward times do not depend on the values)."""
    import json

    from engine.loader import save_checkpoint, save_draft_lora
    from engine.model import TriModeModel

    raw = {"architectures": ["NemotronLabsDiffusionModel"], "model_type": "nemotron_labs_diffusion",
           "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2, "mask_token_id": 3, "block_size": 16,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **shape}
    torch.manual_seed(0)
    model = TriModeModel(ModelConfig.from_dict(raw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for layer in model.encoder.layers:
            o = layer.self_attn.o_proj
            o.set_lora(torch.randn(16, o.in_features) * 0.02, torch.randn(o.out_features, 16) * 0.02, 2.0)
    save_checkpoint(model, path, raw, dtype=dtype)
    save_draft_lora(model, path, 16, 32.0, dtype=dtype)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    return path


def time_sizes(model: str, sizes: list[int], batch_sizes: list[int], context: int, block: int, repeats: int,
               device: str = "cpu", dtype: str = "float32", threads_per_rank: int | None = None
               ) -> dict[tuple[int, int], dict[str, float]]:
    """(tp size, batch) -> ms per forward kind."""
    out = {}
    for size in sizes:
        engine = Engine(EngineConfig(model=model, device=device, dtype=dtype, tensor_parallel_size=size,
                                     num_threads=threads_per_rank,
                                     num_kv_tokens=max(4096, 2 * max(batch_sizes) * (context + block))))
        try:
            for batch in batch_sizes:
                out[(size, batch)] = time_forwards(engine, batch, context, block, repeats, calls=5)
        finally:
            engine.close()
    return out


def _head_rank(rank: int, port: int, hidden: int, vocab: int, rows: list[int], repeats: int, threads: int,
               results: mp.Queue) -> None:
    from engine.parallel.group import TensorParallelGroup, make_store

    torch.set_num_threads(threads)
    store = make_store("127.0.0.1", port, 2, False, 60)  # the parent hosts it
    group = TensorParallelGroup(store, rank, 2, torch.device("cpu"), 60)
    torch.manual_seed(0)
    half = torch.randn(vocab // 2, hidden)
    for m in rows:
        x = torch.randn(m, hidden)
        times = []
        for _ in range(repeats):
            group.all_reduce(torch.zeros(1))  # start together
            t = time.perf_counter()
            part = x @ half.t()
            parts = [torch.empty_like(part) for _ in range(2)]
            group.pg.allgather([parts], [part]).wait()
            if rank == 0:
                torch.cat(parts, dim=-1)
            times.append(time.perf_counter() - t)
        if rank == 0:
            results.put((m, statistics.median(times) * 1e3))


def _time_gemm(weight: torch.Tensor, m: int, repeats: int, threads: int) -> float:
    torch.set_num_threads(threads)
    x = torch.randn(m, weight.shape[1])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x @ weight.t()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def time_head(hidden: int, vocab: int, rows: list[int], repeats: int, threads: int
              ) -> dict[int, tuple[float, float, float]]:
    """rows -> ms of the LM head: replicated on rank 0 with a rank's share of the threads (what the engine runs),
    replicated with every thread, and vocab-parallel over two gloo ranks of a share each (half GEMM + gather)."""
    weight = torch.randn(vocab, hidden)
    per_rank = max(1, threads // 2)
    replicated = {m: (_time_gemm(weight, m, repeats, per_rank), _time_gemm(weight, m, repeats, threads))
                  for m in rows}
    from engine.parallel.group import make_store

    store = make_store("127.0.0.1", 0, 2, True, 60)  # rank 0's store; the ranks below connect to it
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_head_rank, args=(r, store.port, hidden, vocab, rows, repeats, per_rank, results))
             for r in (0, 1)]
    for p in procs:
        p.start()
    parallel = dict(results.get(timeout=600) for _ in rows)
    for p in procs:
        p.join(60)
    return {m: (*replicated[m], parallel[m]) for m in rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tensor_parallel", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: a random checkpoint of --shape)")
    p.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    p.add_argument("--sizes", default="1,2", help="tensor_parallel_size values")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--context", type=int, default=128, help="tokens already cached per sequence")
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads-per-rank", type=int, default=None,
                   help="CPU: torch threads of each rank (default: the ranks share every usable CPU)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: one GPU per rank (NCCL)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--head", action="store_true", help="also time replicated vs vocab-parallel LM head (CPU, gloo)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_random_checkpoint(Path(tmp) / f"random-{args.shape}", SHAPES[args.shape],
                                                          getattr(torch, args.dtype)))
        ms = time_sizes(model, sizes, batch_sizes, args.context, args.block_length, args.repeats, args.device,
                        args.dtype, args.threads_per_rank)
        shape = ModelConfig.from_file(Path(model) / "config.json")
    print(f"{Path(model).name}: hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, "
          f"{shape.num_attention_heads}/{shape.num_key_value_heads} heads, vocab {shape.vocab_size}; {args.dtype}, "
          f"{args.device} ({cpus} CPU(s); threads per rank: {args.threads_per_rank or 'their share'}), "
          f"{args.context} cached tokens per sequence, "
          f"block {args.block_length}; ms per forward (median of {args.repeats})\n")
    kinds = list(next(iter(ms.values())))
    print("| batch | forward | " + " | ".join(f"TP={s} ms" for s in sizes) + " | " +
          " | ".join(f"TP={s} / TP={sizes[0]}" for s in sizes[1:]) + " |")
    print("|---:|---|" + "---:|" * (2 * len(sizes) - 1))
    for batch in batch_sizes:
        for kind in kinds:
            base = ms[(sizes[0], batch)][kind]
            cells = [f"{ms[(s, batch)][kind]:.2f}" for s in sizes]
            ratios = [f"{ms[(s, batch)][kind] / base:.2f}x" for s in sizes[1:]]
            print(f"| {batch} | {kind} | " + " | ".join(cells + ratios) + " |")
    if args.head and args.device == "cpu":
        rows = sorted({1, max(batch_sizes), args.block_length * max(batch_sizes)})
        head = time_head(shape.hidden_size, shape.vocab_size, rows, max(args.repeats, 7), cpus)
        print(f"\nLM head [rows, {shape.hidden_size}] x [{shape.hidden_size}, {shape.vocab_size}], fp32, "
              f"{cpus} thread(s) in all\n")
        share = max(1, cpus // 2)
        print(f"| logit rows | replicated: rank 0, {share} thread(s) ms | replicated, {cpus} thread(s) ms | "
              f"vocab-parallel, 2 x {share} thread(s) + gather ms |")
        print("|---:|---:|---:|---:|")
        for m, (rep, rep_all, par) in head.items():
            print(f"| {m} | {rep:.2f} | {rep_all:.2f} | {par:.2f} |")


if __name__ == "__main__":
    main()
