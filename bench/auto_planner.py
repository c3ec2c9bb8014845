"""`python -m bench.auto_planner`: does `auto`'s cost model predict the steps it takes, and does it pay?

A closed loop of `--concurrency` clients, offline (no HTTP): whenever a request finishes, the next one arrives
`--gap` engine steps later (plus 0-2 steps, so arrivals stagger as they do behind a server), for `--requests`
requests of `--max-tokens` greedy tokens from `--dataset`, once per mode in `--modes`. Per mode it prints output
tokens per second of wall time and per second of engine step time (the planner's own clock: on a CPU the engine
thread's CPU time, which other processes' load does not inflate), tokens per step and, per step shape (rows by
forward kind), how many steps ran, the measured median and the planner's prediction for that step made just
before it learned from it (`ForwardCosts.merged_seconds`, online factors included). A prediction far from the
measurement points at the cost model; predictions that hold while `auto` still loses point elsewhere (acceptance,
or wall time the engine's clock does not see). Figures from a shared machine are noisy: compare modes of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

from engine.forward import Forward
from engine.llm import LLM
from engine.sequence import SamplingParams


def run_mode(llm: LLM, mode: str, prompts: list[list[int]], args: argparse.Namespace) -> None:
    eng = llm.engine
    planner = eng.decoder_ctx.auto
    if planner is None:
        raise SystemExit("this checkpoint has no auto planner (not a tri-mode checkpoint)")
    shapes: dict[tuple, list[tuple[float, float | None]]] = defaultdict(list)
    learn = planner.observe

    def observe(requests, seconds, running, waiting: int = 0) -> None:
        parts: dict[Forward, float] = {}
        for r in requests:
            parts[r.forward] = parts.get(r.forward, 0) + len(r.token_ids)
        predicted = None if Forward.PREFILL in parts else planner.costs.merged_seconds(parts)
        shapes[tuple(sorted((str(k), int(v)) for k, v in parts.items()))].append((seconds, predicted))
        learn(requests, seconds, running, waiting=waiting)

    planner.observe = observe
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, mode=mode, ignore_eos=True)
    try:
        for warm in (True, False):
            shapes.clear()
            total = args.concurrency if warm else args.requests
            issued, finished, step, tokens = 0, 0, 0, 0
            due: list[int] = []
            started = time.perf_counter()
            for _ in range(min(args.concurrency, total)):
                eng.add_request(f"{mode}-{warm}-{issued}", prompts[issued % len(prompts)], params)
                issued += 1
            while finished < total:
                step += 1
                for d in [d for d in due if d <= step]:
                    due.remove(d)
                    eng.add_request(f"{mode}-{warm}-{issued}", prompts[issued % len(prompts)], params)
                    issued += 1
                for out in eng.step():
                    tokens += len(out.new_token_ids)
                    if out.finished:
                        finished += 1
                        if issued + len(due) < total:
                            due.append(step + args.gap + issued % 3)
            wall = time.perf_counter() - started
    finally:
        planner.observe = learn
    engine_s = sum(s for v in shapes.values() for s, _ in v)
    print(f"{mode}: {tokens / wall:.0f} tok/s wall, {tokens / engine_s:.0f} tok/s of engine step time, "
          f"{tokens / step:.2f} tok/step, {step} steps")
    for shape, v in sorted(shapes.items(), key=lambda kv: -len(kv[1]))[:args.top]:
        measured = statistics.median(s for s, _ in v) * 1e3
        preds = [p for _, p in v if p is not None]
        pred = f"{statistics.median(preds) * 1e3:7.2f}" if preds else "      -"
        print(f"  {len(v):5d} x {shape}: measured {measured:7.2f} ms, predicted {pred} ms")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the built-in model)")
    ap.add_argument("--dataset", default="training/data/prompts.jsonl", help="JSONL with a `prompt` per line")
    ap.add_argument("--modes", default="ar,self_spec,auto")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--gap", type=int, default=2, help="engine steps between a finish and the next arrival")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=8, help="step shapes printed per mode")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.max_tokens < 1 or args.gap < 0:
        raise SystemExit("--concurrency, --requests and --max-tokens must be >= 1, --gap >= 0")
    llm = LLM(args.model, num_threads=args.threads)
    if llm.tokenizer is None:
        raise SystemExit("this checkpoint has no tokenizer")
    with open(args.dataset) as f:
        prompts = [llm.tokenizer.encode(json.loads(line)["prompt"]) for line in f if line.strip()]
    for mode in args.modes.split(","):
        run_mode(llm, mode.strip(), prompts, args)


if __name__ == "__main__":
    main()
