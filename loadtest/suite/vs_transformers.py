"""Part 3, ``transformers``: SmolLM2 in ar mode, trimode's server against ``transformers serve
--continuous-batching`` in alternating rounds (or, when that server cannot serve, transformers' batched offline
``generate``, labelled as such), then the speed-ups and the targets."""

from __future__ import annotations

import gc
import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from loadtest.suite.machine import cpu_plan, placed
from loadtest.suite.measure import bench, log, median_run, summarize
from loadtest.suite.servers import running, transformers_server, trimode_server
from loadtest.suite.settings import Settings, prompts_for

SPEEDUP_TARGET = 2.0


def hf_ready_dir(src: Path, out_dir: Path) -> tuple[Path, str | None]:
    """``src`` itself, or a copy-by-symlink with ``architectures`` added to config.json when it lacks one
    (``transformers serve`` resolves the model class from ``config.architectures[0]``)."""
    config = json.loads((src / "config.json").read_text())
    if config.get("architectures"):
        return src, None
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        config.get("model_type", "")
    )
    if arch is None:
        return src, None
    dst = out_dir / f"hf-{src.name}"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    config["architectures"] = [arch]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst, (
        f"{src}/config.json has no 'architectures' (the GGUF conversion drops it) and transformers serve "
        f"reads architectures[0]: served from {dst} (symlinks to the same weights, config with "
        f"architectures={[arch]})"
    )


HF_GEN_CONFIG = {"do_sample": False, "eos_token_id": -1}  # greedy; EOS disabled = ignore_eos


def hf_offline(model_dir: Path, rows: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """Fallback baseline: transformers' batched ``generate`` (left-padded batches of C, greedy, exactly
    ``hf_output_len`` new tokens). TTFT here is the time of a ``max_new_tokens=1`` generate of the first batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if s.threads:
        torch.set_num_threads(s.threads)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, s.dtype),
                                                 local_files_only=True).eval()
    out: dict[str, Any] = {}
    plan = cpu_plan(s)
    with torch.inference_mode(), placed(plan.engine if plan else None):

        def gen(prompts: list[str], new: int) -> int:
            enc = tok(prompts, return_tensors="pt", padding=True)
            res = model.generate(
                **enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id
            )
            return int((res.shape[1] - enc["input_ids"].shape[1]) * res.shape[0])

        gen([rows[0]["prompt"]], 2)  # warm-up
        for c in s.hf_concurrencies:
            n = prompts_for(c, s.per_slot, s.min_prompts)
            prompts = [r["prompt"] for r in rows[:n]]
            t0 = time.perf_counter()
            gen(prompts[:c], 1)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            tokens = sum(gen(prompts[i : i + c], s.hf_output_len) for i in range(0, n, c))
            dt = time.perf_counter() - t0
            out[str(c)] = {
                "num_prompts": n,
                "max_concurrency": c,
                "completed": n,
                "failed": 0,
                "duration": dt,
                "total_output_tokens": tokens,
                "output_throughput": tokens / dt,
                "request_throughput": n / dt,
                "mean_ttft_ms": ttft * 1000.0,
                "ttft_note": "max_new_tokens=1 generate of one batch of C",
            }
            log(f"transformers offline generate c={c}: {tokens / dt:.1f} tok/s")
    model = None
    gc.collect()
    return out


def part_transformers(s: Settings, smol: Path, dataset: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    log_dir = s.out_dir / "logs"
    levels = s.hf_concurrencies
    n_max = max(prompts_for(c, s.per_slot, s.min_prompts) for c in levels)
    result: dict[str, Any] = {
        "model": str(smol),
        "mode": "ar",
        "dtype": s.dtype,
        "concurrencies": levels,
        "input_len": s.hf_input_len,
        "output_len": s.hf_output_len,
        "num_prompts_max": n_max,
        "trimode": {},
        "baseline": {},
        "raw": {"trimode": {}, "baseline": {}},
    }

    def sweep(side: str, url: str, mode: str | None, ignore_eos: bool, extra: dict[str, Any] | None,
              rnd: int) -> None:
        bench(url, dataset, 2, 2, 4, mode=mode, ignore_eos=ignore_eos, extra_body=extra)  # warm-up
        for c in levels:
            n = prompts_for(c, s.per_slot, s.min_prompts)
            res = bench(
                url, dataset, n, c, s.hf_output_len, mode=mode, ignore_eos=ignore_eos, extra_body=extra, seed=s.seed
            )
            result["raw"][side].setdefault(str(c), []).append(res)
            log(
                f"transformers part: round {rnd + 1}/{s.hf_rounds}: {side} c={c}: {res['output_throughput']:.1f} "
                f"tok/s, TTFT {res['mean_ttft_ms']:.0f} ms, {res['completed']}/{n} ok"
            )
            if res["completed"] == 0:
                raise RuntimeError(f"{side}: every request failed at concurrency {c}: {res['errors'][:3]}")

    hf_dir, note = hf_ready_dir(smol, s.out_dir)
    result["hf_model_dir"], result["hf_model_dir_note"] = str(hf_dir), note
    result["baseline_request_extra"] = {"generation_config": json.dumps(HF_GEN_CONFIG)}
    result["rounds"] = s.hf_rounds
    # Rounds alternate the two servers (one at a time, never side by side) so that drift in the other load on a
    # shared machine hits both sides alike; a level's figure is its median round, and every round's pair is kept.
    for rnd in range(s.hf_rounds):
        log(f"transformers part: round {rnd + 1}/{s.hf_rounds}: trimode server on SmolLM2")
        server = trimode_server(str(smol), log_dir, s.threads, "trimode-smollm2", s.dtype, s.engine_cpus)
        with running(server, s.startup_timeout) as url:
            sweep("trimode", url, "ar", True, None, rnd)
        if result.get("transformers_serve_error"):
            continue  # the baseline is the offline fallback, measured once below
        server = transformers_server(str(hf_dir), log_dir, s.threads, s.transformers_exe, s.dtype)
        result["baseline_command"] = shlex.join(server.cmd)
        try:
            log(f"transformers part: round {rnd + 1}/{s.hf_rounds}: transformers serve --continuous-batching")
            with running(server, s.startup_timeout) as url:
                sweep("baseline", url, None, False, {"generation_config": json.dumps(HF_GEN_CONFIG)}, rnd)
            result["baseline_kind"] = "transformers serve --continuous-batching (OpenAI-compatible server)"
            result["transformers_serve_error"] = None
        except Exception as exc:  # the server would not start or serve: record why, measure offline generate instead
            if rnd > 0:
                raise  # it served in an earlier round: a later failure is a real error, not a missing feature
            result["transformers_serve_error"] = f"{type(exc).__name__}: {exc}"
            log(f"transformers serve failed, falling back to offline generate: {exc}")
            result["baseline_kind"] = (
                "FALLBACK: transformers batched generate, offline (no server; "
                "transformers serve failed, see transformers_serve_error)"
            )
            result["raw"]["baseline"] = {}
    fold_rounds(result)
    if result.get("transformers_serve_error"):
        result["baseline"] = hf_offline(hf_dir, rows, s)
    compare(result)
    return result


def fold_rounds(result: dict[str, Any]) -> None:
    """Part 3: per side and level, the table row is the median of the rounds kept under ``raw``."""
    for side in ("trimode", "baseline"):
        for c, runs in result["raw"][side].items():
            result[side][c] = summarize(median_run(runs))


def compare(result: dict[str, Any]) -> None:
    """Speed-ups per level and the two targets (tok/s at the top level >= 2x; TTFT at the lowest no worse)."""
    tri, base = result["trimode"], result["baseline"]
    levels = [c for c in result["concurrencies"] if str(c) in tri and str(c) in base]
    result["speedup"] = {
        str(c): tri[str(c)]["output_throughput"] / base[str(c)]["output_throughput"]
        for c in levels
        if base[str(c)]["output_throughput"]
    }
    result["ttft_ratio"] = {
        str(c): tri[str(c)]["mean_ttft_ms"] / base[str(c)]["mean_ttft_ms"]
        for c in levels
        if base[str(c)].get("mean_ttft_ms")
    }
    raw = result.get("raw", {})
    result["round_speedups"] = {
        str(c): [t["output_throughput"] / b["output_throughput"]
                 for t, b in zip(raw.get("trimode", {}).get(str(c), []), raw.get("baseline", {}).get(str(c), []))
                 if b["output_throughput"]]
        for c in levels
    }
    # same work on both sides: equal prompt and output token totals at every level (usage from each server)
    result["same_token_counts"] = {
        str(c): tri[str(c)].get("total_output_tokens") == base[str(c)].get("total_output_tokens")
        and tri[str(c)].get("total_input_tokens", base[str(c)].get("total_input_tokens"))
        == base[str(c)].get("total_input_tokens", tri[str(c)].get("total_input_tokens"))
        for c in levels
    }
    hi, lo = (max(levels), min(levels)) if levels else (None, None)
    result["targets"] = {
        "throughput_level": hi,
        "throughput_speedup": result["speedup"].get(str(hi)),
        "throughput_target": 2.0,
        "throughput_met": (result["speedup"].get(str(hi)) or 0) >= SPEEDUP_TARGET,
        "ttft_level": lo,
        "ttft_ratio": result["ttft_ratio"].get(str(lo)),
        "ttft_met": result["ttft_ratio"].get(str(lo)) is not None and result["ttft_ratio"][str(lo)] <= 1.0,
    }
