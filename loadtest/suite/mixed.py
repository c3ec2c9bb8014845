"""Part ``mixed``: what one forward carrying every mode buys. On one server, at each concurrency C (default 3, 6,
12), the same N prompts (default 48) run as a 1:1:1 mix of ar, self_spec and diffusion at concurrency C, then as
each mode's third alone at concurrency C / 3 (the same per-mode concurrency). Per run: output tok/s, TPOT per mode,
and weight passes (engine forwards, ``trimode:model_forwards_total``) per generated token; per level: the mix's
weight passes over the three runs' together (the target is <= 0.6) and whether every greedy text is the same in
the mix as alone. An offline count comes first: the engine forwards of the N-request mix against the three modes
run one after another, in this process, counted at the runner (deterministic, no timing).

A server from before ``trimode:model_forwards_total`` ran one forward kind per forward; its weight passes are then
the sum of ``trimode:batch_size_count`` over the kinds, so the same part measures the old rule too.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from loadtest import prometheus
from loadtest.client import RequestInput, endpoint_path
from loadtest.config import BenchmarkConfig
from loadtest.metrics import compute_metrics
from loadtest.runner import dispatch, first_model

MIX = ("ar", "self_spec", "diffusion")  # request i runs MIX[i % 3]
MIXED_TARGET = 0.6  # the mix's weight passes over the modes' alone, at most
MODEL_FORWARDS = "trimode:model_forwards"
GEN_TOKENS = "trimode:generation_tokens"


def weight_passes(before: list[prometheus.Sample] | None, after: list[prometheus.Sample] | None,
                  model: str | None) -> float | None:
    """Engine forwards between two scrapes (see the module docstring for servers without the counter)."""
    delta = prometheus.counter_delta(before, after, MODEL_FORWARDS, model)
    if delta is not None or before is None or after is None:
        return delta

    def kinds(samples: list[prometheus.Sample]) -> float:
        return sum(v for name, labels, v in samples if name == "trimode:batch_size_count"
                   and labels.get("model_name", model) == model)

    return kinds(after) - kinds(before)


async def _run(url: str, requests: list[RequestInput], concurrency: int, knobs: dict[str, Any]) -> dict[str, Any]:
    cfg = BenchmarkConfig(base_url=url, num_prompts=len(requests), max_concurrency=concurrency, ignore_eos=True,
                          no_progress=True, tokenize=False, **knobs)
    conns = concurrency + 4
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(3600.0, connect=30.0), trust_env=False) as client:
        model = await first_model(client, url, {})
        before = await prometheus.scrape(client, url)
        outputs, duration = await dispatch(client, cfg, requests, model, url + endpoint_path(cfg.endpoint))
        after = await prometheus.scrape(client, url)
    res = compute_metrics(outputs, duration)
    passes = weight_passes(before, after, model)
    tokens = prometheus.counter_delta(before, after, GEN_TOKENS, model)
    return {
        "concurrency": concurrency,
        "num_prompts": len(requests),
        "completed": res["completed"],
        "duration": duration,
        "total_output_tokens": res["total_output_tokens"],
        "output_throughput": res["output_throughput"],
        "mean_tpot_ms": res["mean_tpot_ms"],
        "tpot_ms_by_mode": {m: v["mean_tpot_ms"] for m, v in res["per_mode"].items()},
        "weight_passes": passes,
        "generation_tokens": tokens,
        "weight_passes_per_token": passes / tokens if passes is not None and tokens else None,
        "errors": [o.error for o in outputs if not o.success][:3],
        "texts": {o.index: o.generated_text for o in outputs if o.success},
    }


def one_level(url: str, requests: list[RequestInput], concurrency: int, knobs: dict[str, Any]) -> dict[str, Any]:
    """The mix at ``concurrency``, then each mode's requests alone at a third of it."""
    mixed = asyncio.run(_run(url, requests, concurrency, knobs))
    alone = {m: asyncio.run(_run(url, [r for r in requests if r.mode == m], max(1, concurrency // 3), knobs))
             for m in MIX}
    texts = {i: t for a in alone.values() for i, t in a.pop("texts").items()}
    mixed_texts = mixed.pop("texts")
    passes = [a["weight_passes"] for a in alone.values()]
    tokens = [a["generation_tokens"] for a in alone.values()]
    alone_passes = sum(passes) if None not in passes else None
    alone_tokens = sum(tokens) if None not in tokens else None
    alone_time = sum(a["duration"] for a in alone.values())
    per_token = alone_passes / alone_tokens if alone_passes is not None and alone_tokens else None
    ratio = (mixed["weight_passes_per_token"] / per_token
             if mixed["weight_passes_per_token"] is not None and per_token else None)
    return {
        "concurrency": concurrency,
        "mixed": mixed,
        "alone": alone,
        "alone_output_throughput": sum(a["total_output_tokens"] for a in alone.values()) / alone_time,
        "alone_weight_passes_per_token": per_token,
        "weight_pass_ratio": ratio,
        "meets_target": ratio is not None and ratio <= MIXED_TARGET,
        "same_texts": mixed_texts == texts and len(texts) == len(requests),
        "num_different_texts": sum(mixed_texts.get(i) != t for i, t in texts.items()),
    }


def offline_count(model: str, prompt_ids: list[list[int]], output_len: int, concurrency: int, dtype: str,
                  knobs: dict[str, Any]) -> dict[str, Any]:
    """Runner forwards of the mix at ``concurrency`` against each mode alone at a third of it (in this process)."""
    from engine.llm import LLM
    from engine.sequence import SamplingParams

    params = [SamplingParams(max_tokens=output_len, ignore_eos=True, mode=MIX[i % 3], **knobs)
              for i in range(len(prompt_ids))]

    def count(ids: list[int], seqs: int) -> tuple[int, dict[int, list[int]]]:
        llm = LLM(model, device="cpu", dtype=dtype, max_num_seqs=seqs)
        runner, calls = llm.engine.runner, [0]
        run = runner.run

        def counted(batch: Any) -> Any:
            calls[0] += 1
            return run(batch)

        runner.run = counted
        outs = llm.generate([prompt_ids[i] for i in ids], [params[i] for i in ids])
        return calls[0], {i: o.token_ids for i, o in zip(ids, outs)}

    mixed, mixed_out = count(list(range(len(prompt_ids))), concurrency)
    alone, alone_out = {}, {}
    for m in range(3):
        alone[MIX[m]], outs = count(list(range(m, len(prompt_ids), 3)), max(1, concurrency // 3))
        alone_out.update(outs)
    total = sum(alone.values())
    return {"num_prompts": len(prompt_ids), "concurrency": concurrency, "output_len": output_len,
            "mixed_forwards": mixed, "alone_forwards": alone, "alone_forwards_total": total,
            "ratio": mixed / total, "meets_target": mixed / total <= MIXED_TARGET,
            "same_tokens": mixed_out == alone_out}


def part_mixed(model: str, url: str, rows: list[dict[str, Any]], tok: Any, concurrencies: list[int],
               num_prompts: int, output_len: int, dtype: str, knobs: dict[str, Any], log: Any) -> dict[str, Any]:
    """The offline count, then every level (see the module docstring)."""
    n = num_prompts - num_prompts % 3
    if n < 3 or len(rows) < n:
        raise ValueError(f"the mixed part needs a multiple of 3 prompts (>= 3, <= {len(rows)}), got {num_prompts}")
    offline = offline_count(model, [tok.encode(r["prompt"]) for r in rows[:n]], output_len, max(concurrencies),
                            dtype, knobs)
    log(f"mixed: offline, {n} requests at concurrency {max(concurrencies)}: {offline['mixed_forwards']} forwards "
        f"mixed vs {offline['alone_forwards_total']} alone ({offline['ratio']:.3f}), same tokens "
        f"{offline['same_tokens']}")
    requests = [RequestInput(index=i, prompt=r["prompt"], output_len=output_len, mode=MIX[i % 3])
                for i, r in enumerate(rows[:n])]
    asyncio.run(_run(url, requests[:6], 3, knobs))  # warm-up
    levels = []
    for c in concurrencies:
        level = one_level(url, requests, c, knobs)
        m = level["mixed"]
        log(f"mixed: c={c}: mix {m['output_throughput']:.1f} tok/s, {m['weight_passes_per_token'] or 0:.3f} passes/tok "
            f"vs alone {level['alone_output_throughput']:.1f} tok/s, {level['alone_weight_passes_per_token'] or 0:.3f} "
            f"passes/tok; ratio {level['weight_pass_ratio'] or 0:.3f}; same texts {level['same_texts']}")
        levels.append(level)
    return {"model": model, "num_prompts": n, "output_len": output_len, "knobs": knobs, "target": MIXED_TARGET,
            "offline": offline, "levels": levels}


def summary_lines(mx: dict[str, Any], fmt: Any) -> list[str]:
    """The part's section of summary.md."""
    off = mx["offline"]
    lines = [
        "",
        f"## Mixed modes ({mx['num_prompts']} requests, {mx['output_len']} out, 1:1:1 ar / self_spec / diffusion, "
        f"knobs {mx['knobs'] or 'server defaults'})",
        "",
        f"Offline, counted at the runner: the mix at concurrency {off['concurrency']} takes **{off['mixed_forwards']}"
        f"** forwards, the three modes alone at {max(1, off['concurrency'] // 3)} take "
        + " + ".join(f"{v} ({m})" for m, v in off["alone_forwards"].items())
        + f" = {off['alone_forwards_total']}: ratio **{fmt(off['ratio'], 3)}** (target <= {mx['target']}: "
        f"{fmt(off['meets_target'])}); same tokens: **{fmt(off['same_tokens'])}**.",
        "",
        "| concurrency | run | output tok/s | TPOT ms ar / self_spec / diffusion | weight passes / token "
        "| ratio | same texts |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in mx["levels"]:
        m = lv["mixed"]
        tp = m["tpot_ms_by_mode"]
        lines.append(f"| {lv['concurrency']} | mix | {fmt(m['output_throughput'])} | "
                     + " / ".join(fmt(tp.get(k)) for k in MIX)
                     + f" | {fmt(m['weight_passes_per_token'], 3)} | **{fmt(lv['weight_pass_ratio'], 3)}** | "
                     f"{fmt(lv['same_texts'])} |")
        for mode, a in lv["alone"].items():
            lines.append(f"| {lv['concurrency']} | {mode} alone at {a['concurrency']} | {fmt(a['output_throughput'])}"
                         f" | {fmt(a['mean_tpot_ms'])} | {fmt(a['weight_passes_per_token'], 3)} | | |")
        lines.append(f"| {lv['concurrency']} | the three alone, one after another | "
                     f"{fmt(lv['alone_output_throughput'])} | | {fmt(lv['alone_weight_passes_per_token'], 3)} | | |")
    return lines

