"""Prefix caching, measured over HTTP: `python -m bench.prefix_cache [--models builtin,smollm2] [--out FILE]`.

For each model it starts `trimode serve` twice, with prefix caching on (the default) and with
`--no-enable-prefix-caching`, and runs on each server:

- the shared-prefix workload (loadtest's `--prefix-len 1024 --num-prefixes 1 --input-len 32`): one warm-up
  request (untimed, on either server, so the cache-on server holds the prefix as a server in use would), then
  mean TTFT over `--c1-prompts` requests at concurrency 1 (target: on <= 0.25 x off), and output tok/s over
  `--c8-prompts` requests at concurrency 8 (target: on >= 1.5 x off);
- the multi-turn chat workload (loadtest's `--multi-turn`): conversations re-sending their history each turn,
  TTFT and cached share by turn, and the server's hit rate.

Greedy, `ignore_eos`, the model's default mode. CPU figures on a machine shared with other processes are noisy:
compare the on / off ratios, which both servers see alike, more than the absolute times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from loadtest import prometheus
from loadtest.client import endpoint_path
from loadtest.config import BenchmarkConfig
from loadtest.dataset import RemoteTokenizer, build_requests
from loadtest.metrics import compute_metrics
from loadtest.runner import dispatch, first_model, run_benchmark
from loadtest.suite.servers import running, trimode_server

PREFIX_LEN = 1024
SUFFIX_LEN = 32
TTFT_TARGET = 0.25  # mean TTFT with caching / without, at concurrency 1, at most
THROUGHPUT_TARGET = 1.5  # output tok/s with caching / without, at concurrency 8, at least


def model_path(name: str) -> str:
    if name == "builtin":
        from engine.engine import default_model_path

        return default_model_path()
    if name == "smollm2":
        from convert.gguf import smollm2_dir

        return str(smollm2_dir())
    return name


async def shared_prefix(url: str, concurrency: int, num_prompts: int, output_len: int, seed: int) -> dict[str, Any]:
    """One warm-up request, then `num_prompts` requests sharing its 1,024-token prefix at `concurrency`."""
    cfg = BenchmarkConfig(base_url=url, num_prompts=num_prompts + 1, max_concurrency=concurrency,
                          prefix_len=PREFIX_LEN, num_prefixes=1, input_len=SUFFIX_LEN, output_len=output_len,
                          ignore_eos=True, no_progress=True, seed=seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0), trust_env=False) as client:
        model = await first_model(client, url, {})
        requests = await build_requests(cfg, RemoteTokenizer(client, url))
        target = url + endpoint_path(cfg.endpoint)
        await dispatch(client, cfg, requests[:1], model, target)
        before = await prometheus.scrape(client, url)
        outputs, duration = await dispatch(client, cfg, requests[1:], model, target)
        after = await prometheus.scrape(client, url)
    res = compute_metrics(outputs, duration)
    return {"concurrency": concurrency, "completed": res["completed"], "mean_ttft_ms": res["mean_ttft_ms"],
            "output_throughput": res["output_throughput"], "mean_prompt_tokens": res["total_input_tokens"]
            / max(res["completed"], 1), "cached_tokens": res["total_cached_tokens"],
            "prefix_cache": prometheus.prefix_cache(before, after, model)}


def multi_turn(url: str, conversations: int, turns: int, seed: int) -> dict[str, Any]:
    cfg = BenchmarkConfig(base_url=url, endpoint="chat", num_prompts=conversations, max_concurrency=conversations,
                          multi_turn=turns, input_len=64, output_len=32, ignore_eos=True, no_progress=True, seed=seed)
    res = asyncio.run(run_benchmark(cfg))
    return {"by_turn": res["multi_turn"], "prefix_cache": res["prefix_cache"], "completed": res["completed"]}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    path = model_path(name)
    out: dict[str, Any] = {"model": name, "path": path}
    for caching in (True, False):
        tag = "on" if caching else "off"
        server = trimode_server(path, Path(args.log_dir), args.threads, f"prefix-{name}-{tag}")
        if not caching:
            server.cmd.append("--no-enable-prefix-caching")
        with running(server, args.startup_timeout) as url:
            print(f"[{name}, caching {tag}] shared prefix, concurrency 1", flush=True)
            c1 = asyncio.run(shared_prefix(url, 1, args.c1_prompts, 4, args.seed))
            print(f"[{name}, caching {tag}] shared prefix, concurrency 8", flush=True)
            c8 = asyncio.run(shared_prefix(url, 8, args.c8_prompts, 32, args.seed + 1))
            print(f"[{name}, caching {tag}] multi-turn", flush=True)
            mt = multi_turn(url, args.conversations, args.turns, args.seed + 2)
        out[tag] = {"c1": c1, "c8": c8, "multi_turn": mt}
    on, off = out["on"], out["off"]
    out["ttft_ratio_c1"] = on["c1"]["mean_ttft_ms"] / off["c1"]["mean_ttft_ms"]
    out["throughput_ratio_c8"] = on["c8"]["output_throughput"] / off["c8"]["output_throughput"]
    return out


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| model | caching | c=1 mean TTFT (ms) | c=8 output tok/s | c=1 hit rate |",
             "|---|---|---|---|---|"]
    for r in results:
        for tag in ("on", "off"):
            x = r[tag]
            rate = x["c1"]["prefix_cache"]["hit_rate"]
            lines.append(f"| {r['model']} | {tag} | {x['c1']['mean_ttft_ms']:.1f} | {x['c8']['output_throughput']:.1f} "
                         f"| {'n/a' if rate is None else f'{100 * rate:.1f}%'} |")
    lines.append("")
    for r in results:
        ok1 = "met" if r["ttft_ratio_c1"] <= TTFT_TARGET else "MISSED"
        ok8 = "met" if r["throughput_ratio_c8"] >= THROUGHPUT_TARGET else "MISSED"
        lines.append(f"{r['model']}: TTFT on/off {r['ttft_ratio_c1']:.3f} (target <= {TTFT_TARGET}: {ok1}); "
                     f"tok/s on/off {r['throughput_ratio_c8']:.2f} (target >= {THROUGHPUT_TARGET}: {ok8})")
    lines.append("")
    lines.append("| model | caching | turn | mean TTFT (ms) | mean prompt tokens | cached share |")
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        for tag in ("on", "off"):
            for t in r[tag]["multi_turn"]["by_turn"]:
                share = "n/a" if t["hit_rate"] is None else f"{100 * t['hit_rate']:.1f}%"
                lines.append(f"| {r['model']} | {tag} | {t['turn']} | {t['mean_ttft_ms']:.1f} | "
                             f"{t['mean_prompt_tokens']:.0f} | {share} |")
    for r in results:
        rate = r["on"]["multi_turn"]["prefix_cache"]["hit_rate"]
        lines.append(f"\n{r['model']}: multi-turn server hit rate (caching on) "
                     f"{'n/a' if rate is None else f'{100 * rate:.1f}%'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="builtin,smollm2", help="builtin, smollm2 or checkpoint paths, comma-separated")
    p.add_argument("--c1-prompts", type=int, default=8)
    p.add_argument("--c8-prompts", type=int, default=16)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch threads of each server (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", default="/tmp/trimode-bench-prefix-cache")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    results = [run_model(m.strip(), args) for m in args.models.split(",") if m.strip()]
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
