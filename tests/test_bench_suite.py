"""The load generator against a live trimode server (a tiny random checkpoint), and the benchmark suite's modes part,
plot and summary on that server. The suite itself (python -m loadtest.suite) is not run here."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.decoding.modes import MODES
from loadtest import BenchmarkConfig, run_benchmark
from loadtest.suite.machine import START_CPUS, cpu_plan, machine_info, placed
from loadtest.suite.modes import auto_vs_best_paired, crossover, crossover_note, part_modes, round_order
from loadtest.suite.prompts import build_prompts, load_local_tokenizer
from loadtest.suite.report import plot_modes, summary_markdown
from loadtest.suite.settings import Settings, build_parser, settings_from
from loadtest.suite.vs_transformers import compare, fold_rounds
from tests.server_fixtures import live_server, write_served_checkpoint

TOP_KEYS = [
    "date", "backend", "base_url", "endpoint", "model_id", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "tokenize_used", "duration", "completed", "failed", "total_input_tokens",
    "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
    "max_output_tokens_per_s", "max_concurrent_requests", "total_chunks", "mean_tokens_per_chunk", "per_mode",
    "input_lens", "output_lens", "ttfts", "itls", "latencies", "modes", "tokens_per_forward", "server_counters",
    "spec_decode", "metrics_scraped", "errors", "config",
]  # fmt: skip
PER_MODE_KEYS = [
    "completed",
    "failed",
    "total_output_tokens",
    "output_throughput",
    "mean_ttft_ms",
    "mean_tpot_ms",
    "mean_itl_ms",
    "mean_e2el_ms",
    "mean_tokens_per_chunk",
]
SPEC_KEYS = ["num_drafts", "num_draft_tokens", "num_accepted_tokens", "acceptance_rate", "acceptance_length"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_served_checkpoint(tmp_path_factory.mktemp("bench-ckpt"))


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[str]:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from server.app import create_app
    from server.config import ServerConfig

    engine = Engine(
        EngineConfig(model=str(ckpt), device="cpu", num_kv_tokens=4096, max_num_seqs=16, max_num_batched_tokens=512)
    )
    with live_server(create_app(engine, ServerConfig(log_level="warning"))) as url:
        yield url


MIX = ",".join(f"{m}=1" for m in MODES)  # two requests of every mode
N = 2 * len(MODES)


def test_load_generator_against_live_server(server: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    cfg = BenchmarkConfig(
        base_url=server,
        num_prompts=N,
        max_concurrency=3,
        input_len=12,
        output_len=8,
        mode_mix=MIX,
        ignore_eos=True,
        no_progress=True,
        seed=1,
        save_result=str(out),
    )
    returned = asyncio.run(run_benchmark(cfg))
    result = json.loads(out.read_text())
    assert result["completed"] == returned["completed"] == N, result["errors"]
    for key in TOP_KEYS:
        assert key in result, key
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            assert result[f"{stat}_{metric}_ms"] >= 0, (stat, metric)
    assert result["failed"] == 0 and result["errors"] == []
    assert result["total_output_tokens"] == N * 8 and result["output_lens"] == [8] * N  # ignore_eos: exact lengths
    assert result["tokenize_used"] is True  # whole words fitted to ~12 char tokens with /tokenize
    assert abs(result["total_input_tokens"] - N * 12) <= N * 4 and len(result["input_lens"]) == N
    assert result["metrics_scraped"] is True
    assert sorted(result["modes"]) == sorted(MODES * 2)  # the server reports the mode it ran
    for mode in MODES:
        per = result["per_mode"][mode]
        for key in PER_MODE_KEYS:
            assert key in per, (mode, key)
        assert per["completed"] == 2 and per["total_output_tokens"] == 16
        assert result["tokens_per_forward"][mode] > 0, mode  # from the server's Prometheus counters
        assert result["server_counters"][mode]["generation_tokens"] >= 16
    for key in SPEC_KEYS:
        assert key in result["spec_decode"], key
    assert result["spec_decode"]["num_drafts"] > 0  # self_spec drafted
    assert result["config"]["mode_mix"] == MIX


def test_suite_modes_part_plot_and_summary(server: str, ckpt: Path, tmp_path: Path) -> None:
    settings = settings_from(
        build_parser().parse_args(
            ["--quick", "--concurrencies", "1,2", "--output-len", "6", "--input-len", "10", "--mode-rounds", "2",
             "--out-dir", str(tmp_path)]
        )
    )
    tok = load_local_tokenizer(str(ckpt))
    dataset = tmp_path / "prompts.jsonl"
    rows = build_prompts(tok, 2, settings.input_len, settings.output_len, 0, dataset)
    assert all(abs(len(tok.encode(r["prompt"])) - 10) <= 4 for r in rows)  # whole words, ~10 char tokens
    modes = part_modes(settings, str(ckpt), server, dataset)
    assert set(modes["table"]) == set(MODES)
    for mode, table in modes["table"].items():
        assert [r["concurrency"] for r in table] == [1, 2]
        for row in table:
            assert row["completed"] == row["num_prompts"] == 2, (mode, row["errors"])
            assert row["total_output_tokens"] == 12 and row["output_throughput"] > 0 and row["mean_tpot_ms"] > 0
            assert row["tokens_per_forward"] is not None
            rounds = row["rounds_output_throughput"]
            assert len(rounds) == 2 and row["output_throughput"] == min(rounds)  # the lower middle of two
            assert len(modes["raw"][mode][str(row["concurrency"])]) == 2
    assert modes["crossover_concurrency"] == crossover(modes["table"])
    assert modes["rounds"] == 2 and len(modes["crossover_by_round"]) == 2
    plot_modes(modes, tmp_path / "modes.png", "tiny")
    assert (tmp_path / "modes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = {
        "command": "python -m loadtest.suite --quick",
        "started_at": "t0",
        "finished_at": "t1",
        "modes": modes,
        "machine": machine_info(1),
        "load": {"modes": {"mean": 1.0, "max": 2.0}},
    }
    md = summary_markdown(res)
    assert "| self_spec | 2 | 2/2 |" in md and "rossover" in md and "Crossover by round" in md
    assert "Paired by round" in md and set(modes["auto_vs_best_paired"]) == {"1", "2"}


def test_crossover_rule() -> None:
    def table(ar: list[float], ss: list[float]) -> dict:
        return {
            "ar": [{"concurrency": c, "output_throughput": v} for c, v in zip((1, 2, 4), ar)],
            "self_spec": [{"concurrency": c, "output_throughput": v} for c, v in zip((1, 2, 4), ss)],
        }

    assert crossover(table([1, 2, 5], [3, 3, 4])) == 4
    assert crossover(table([1, 3, 5], [3, 3, 4])) == 2  # equal counts as overtaken
    assert crossover(table([1, 2, 3], [3, 4, 5])) is None
    assert "wins nowhere" in crossover_note(1, [1, 2, 4])
    assert crossover_note(None, [1, 2, 4]).startswith("no crossover")


def test_auto_ratio_pairs_rounds_and_modes_rotate() -> None:
    def rounds(*tps: float) -> list[dict]:
        return [{"output_throughput": v} for v in tps]

    # round 2 was slow for everyone: ratios of medians pair auto's slow round with ar's fast one, pairs do not
    runs = {"ar": {1: rounds(100, 60, 100)}, "self_spec": {1: rounds(50, 30, 120)}, "auto": {1: rounds(99, 59, 60)}}
    paired = auto_vs_best_paired(runs)
    assert paired is not None and paired["1"] == pytest.approx(59 / 60)  # median of 0.99, 0.983, 0.5
    assert auto_vs_best_paired({"ar": runs["ar"]}) is None
    orders = [tuple(round_order(["ar", "self_spec", "auto"], r)) for r in range(6)]
    assert orders[:2] == [("ar", "self_spec", "auto"), ("auto", "self_spec", "ar")]
    assert len(set(orders)) == 6  # every order once: each mode first, last and after each other one
    assert round_order(["ar", "auto"], 7) == ["ar", "auto"]


def test_transformers_part_folds_rounds_into_medians_and_pairs() -> None:
    def run(tps: float, ttft: float) -> dict:
        return {"output_throughput": tps, "mean_ttft_ms": ttft, "total_output_tokens": 96, "total_input_tokens": 64}

    res = {
        "concurrencies": [1, 16],
        "rounds": 3,
        "trimode": {},
        "baseline": {},
        "raw": {
            "trimode": {"1": [run(10, 100), run(12, 90), run(11, 95)], "16": [run(90, 1), run(70, 1), run(80, 1)]},
            "baseline": {"1": [run(10, 120), run(10, 110), run(9, 130)], "16": [run(40, 1), run(45, 1), run(30, 1)]},
        },
    }
    fold_rounds(res)
    compare(res)
    assert res["trimode"]["16"]["output_throughput"] == 80 and res["baseline"]["16"]["output_throughput"] == 40
    assert res["speedup"]["16"] == 2.0 and res["targets"]["throughput_met"]
    assert res["trimode"]["1"]["mean_ttft_ms"] == 95 and res["baseline"]["1"]["mean_ttft_ms"] == 120
    assert res["targets"]["ttft_met"] and res["same_token_counts"] == {"1": True, "16": True}
    assert [round(x, 3) for x in res["round_speedups"]["16"]] == [2.25, 1.556, 2.667]  # round by round
    md = summary_markdown({
        "command": "x", "started_at": "t0", "machine": machine_info(1),
        "transformers": {**res, "input_len": 64, "output_len": 32, "baseline_kind": "k"},
    })
    assert "median of 3 rounds" in md and "concurrency 16: 2.25x, 1.56x, 2.67x" in md


def test_suite_places_itself_as_the_servers_do() -> None:
    from server.affinity import plan_cpus

    def settings(*flags: str) -> Settings:
        return settings_from(build_parser().parse_args(["--quick", *flags]))

    assert cpu_plan(settings("--engine-cpus", "none")) is None
    with pytest.raises(SystemExit, match="invalid --engine-cpus='x'"):
        settings("--engine-cpus", "x")
    with pytest.raises(SystemExit, match="--mode-rounds must be >= 1"):
        settings("--mode-rounds", "0")
    assert cpu_plan(settings()) == plan_cpus("auto", True, 1, START_CPUS)  # --threads 1 by default
    if START_CPUS is None or len(START_CPUS) < 2:
        pytest.skip("needs Linux and at least two usable CPUs")
    before = os.sched_getaffinity(0)
    with placed((START_CPUS[-1],)):
        assert os.sched_getaffinity(0) == {START_CPUS[-1]}
    assert os.sched_getaffinity(0) == before
    with placed(None):
        assert os.sched_getaffinity(0) == before
