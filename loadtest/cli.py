"""Command line: ``python -m loadtest --base-url URL ...`` (flags modelled on ``vllm bench serve``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import httpx

from loadtest.config import BenchmarkConfig
from loadtest.report import format_report
from loadtest.runner import run_benchmark


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    d = BenchmarkConfig()
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    p.add_argument("--base-url", default=d.base_url, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=["completions", "chat"], default=d.endpoint)
    p.add_argument("--model", default=None, help="model name (default: first entry of /v1/models)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument(
        "--request-rate",
        type=float,
        default=d.request_rate,
        help="requests/s; inf (default) sends all at t=0, else Poisson/gamma arrivals",
    )
    p.add_argument(
        "--burstiness", type=float, default=d.burstiness, help="gamma shape of the gaps; 1 = Poisson"
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on in-flight requests")
    p.add_argument("--input-len", type=int, default=d.input_len, help="random prompt length in tokens")
    p.add_argument("--output-len", type=int, default=d.output_len, help="max_tokens per request")
    p.add_argument("--dataset", default=None, help='jsonl file with "prompt" and optional "output_len"')
    p.add_argument("--prefix-len", type=int, default=d.prefix_len,
                   help="shared-prefix workload: a random prefix of this many tokens before each --input-len "
                   "suffix (vLLM bench's prefix repetition); 0 = none")
    p.add_argument("--num-prefixes", type=int, default=d.num_prefixes,
                   help="distinct prefixes, used round-robin by the requests")
    p.add_argument("--multi-turn", type=int, default=d.multi_turn, metavar="TURNS",
                   help="multi-turn chat: --num-prompts conversations of TURNS turns each, re-sending the whole "
                   "conversation with a new --input-len user message every turn (needs --endpoint chat)")
    p.add_argument(
        "--mode-mix",
        default=None,
        help="weights, e.g. ar=1,diffusion=1,self_spec=1 (default: no mode key, server default)",
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--block-length", type=int, default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-result", default=None, metavar="FILE", help="write the JSON result here")
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument(
        "--no-tokenize",
        dest="tokenize",
        action="store_false",
        help="do not call POST /tokenize to fit random prompts to --input-len",
    )
    p.add_argument(
        "--metric-percentiles", default=d.metric_percentiles, help="console percentiles, e.g. 50,90,99"
    )
    p.add_argument("--request-timeout", type=float, default=d.request_timeout, help="seconds per request")
    p.add_argument(
        "--extra-body", type=json.loads, default={}, help="JSON object merged into every request body"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the report. Exit status: 0 ok, 1 no request succeeded, 2 setup error."""
    args = build_parser().parse_args(argv)
    try:
        cfg = BenchmarkConfig.coerce(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(run_benchmark(cfg))
    except (httpx.HTTPError, OSError, RuntimeError, ValueError) as exc:  # server unreachable, bad dataset
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    for msg in result["errors"][:3]:
        print(f"error sample: {msg}", file=sys.stderr)
    return 0 if result["completed"] else 1
