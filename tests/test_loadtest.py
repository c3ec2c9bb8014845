"""Tests for the loadtest package against a tiny fake OpenAI-compatible streaming server run in-process."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from loadtest import BenchmarkConfig, format_report, run_benchmark
from loadtest.cli import main
from loadtest.client import iter_sse_data
from loadtest.config import parse_mode_mix
from loadtest.dataset import assign_modes
from loadtest.metrics import percentile
from loadtest.prometheus import parse_metrics

MODEL = "fake-model"
TOKENS_PER_CHUNK = {"ar": 1, "diffusion": 4, "self_spec": 2, "broken": 1}
SENT = ("ar", "diffusion", "self_spec")  # the modes test_mixed_modes_json sends (auto's chunks depend on its choices)


class FakeState:
    """Counters and switches of the fake server."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, str], float] = {("generation_tokens", "ar"): 0.0}
        self.metrics_enabled = True
        self.tokenize_enabled = True
        self.payloads: list[dict[str, Any]] = []

    def add(self, name: str, mode: str, value: float) -> None:
        with self.lock:
            self.counters[(name, mode)] = self.counters.get((name, mode), 0.0) + value

    def exposition(self) -> str:
        lines: list[str] = []
        with self.lock:
            names = sorted({name for name, _ in self.counters})
            for name in names:
                lines.append(f"# HELP trimode:{name}_total fake counter")
                lines.append(f"# TYPE trimode:{name}_total counter")
                for (n, mode), value in sorted(self.counters.items()):
                    if n == name:
                        lines.append(f'trimode:{name}_total{{model_name="{MODEL}",mode="{mode}"}} {value}')
        lines.append("# TYPE trimode:num_requests_running gauge")
        lines.append(f'trimode:num_requests_running{{model_name="{MODEL}"}} 0.0')
        return "\n".join(lines) + "\n"


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        if not state.tokenize_enabled:
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)
        n = len((await request.json())["prompt"].split())
        return {"tokens": list(range(n)), "count": n}

    @app.get("/metrics")
    async def metrics() -> Any:
        if not state.metrics_enabled:
            return PlainTextResponse("not found", status_code=404)
        return PlainTextResponse(state.exposition())

    async def generate(request: Request, chat: bool) -> Any:
        body = await request.json()
        state.payloads.append(body)
        mode = body.get("mode", "ar")
        if mode not in TOKENS_PER_CHUNK:
            err = {"message": f"unknown mode {mode}", "type": "BadRequestError", "param": "mode", "code": 400}
            return JSONResponse({"error": err}, status_code=400)
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        n_out = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        tpc = TOKENS_PER_CHUNK[mode]
        base = {"id": "cmpl-1", "created": 1, "model": MODEL, "mode": mode}
        base["object"] = "chat.completion.chunk" if chat else "text_completion"

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        async def stream() -> AsyncIterator[str]:
            if chat:
                role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield f"data: {json.dumps({**base, 'choices': [role]})}\n\n"
            sent = 0
            while sent < n_out:
                await asyncio.sleep(0.003)
                k = min(tpc, n_out - sent)
                sent += k
                finish = "length" if sent >= n_out else None
                yield f"data: {json.dumps({**base, 'choices': [choice(' tok' * k, finish)]})}\n\n"
                if mode == "broken":
                    yield 'data: {"error": {"message": "engine exploded", "type": "InternalServerError"}}\n\n'
                    yield "data: [DONE]\n\n"
                    return
            forwards = math.ceil(n_out / tpc)
            state.add("generation_tokens", mode, n_out)
            state.add("forward_passes", mode, forwards)
            if mode == "self_spec":
                state.add("spec_decode_num_drafts", mode, forwards)
                state.add("spec_decode_num_draft_tokens", mode, 3 * forwards)
                state.add("spec_decode_num_accepted_tokens", mode, forwards)
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n_out}
            usage["total_tokens"] = usage["prompt_tokens"] + n_out
            if chat and len(body["messages"]) > 1:  # a later turn: the fake "caches" 2 tokens per earlier message
                history = len(body["messages"]) - 1
                usage["prompt_tokens"] = sum(len(m["content"].split()) for m in body["messages"])
                usage["prompt_tokens_details"] = {"cached_tokens": 2 * history}
                state.add("prefix_cache_queries", mode, usage["prompt_tokens"])
                state.add("prefix_cache_hits", mode, 2 * history)
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FakeState]]:
    state = FakeState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(state), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture()
def server_state(fake_server: tuple[str, FakeState]) -> Iterator[tuple[str, FakeState]]:
    url, state = fake_server
    state.metrics_enabled = state.tokenize_enabled = True
    state.payloads.clear()
    yield url, state
    state.metrics_enabled = state.tokenize_enabled = True


RESULT_KEYS = [
    "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
    "duration", "ttfts", "itls", "latencies", "per_mode", "tokens_per_forward", "spec_decode", "errors",
    "config", "mean_tokens_per_chunk",
]  # fmt: skip


def test_mixed_modes_json(server_state: tuple[str, FakeState], tmp_path: Any) -> None:
    url, state = server_state
    out_file = tmp_path / "result.json"
    cfg = BenchmarkConfig(
        base_url=url, num_prompts=6, input_len=20, output_len=8, max_concurrency=4, seed=3,
        mode_mix=",".join(f"{m}=1" for m in SENT), block_length=4, threshold=0.9, no_progress=True,
        save_result=str(out_file), api_key="secret",
    )  # fmt: skip
    returned = asyncio.run(run_benchmark(cfg))
    result = json.loads(out_file.read_text())
    assert result["completed"] == returned["completed"] == 6
    for key in RESULT_KEYS:
        assert key in result, key
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            value = result[f"{stat}_{metric}_ms"]
            assert value >= 0, (stat, metric)
        assert result[f"p99_{metric}_ms"] >= result[f"median_{metric}_ms"]
    assert result["failed"] == 0 and result["errors"] == []
    assert result["total_output_tokens"] == 48
    assert result["total_input_tokens"] == 6 * 20  # /tokenize fitted every prompt exactly
    assert result["tokenize_used"] is True
    assert 1 <= result["max_concurrent_requests"] <= 4
    assert 0 < result["max_output_tokens_per_s"] <= 48
    assert result["request_throughput"] == pytest.approx(6 / result["duration"])
    assert result["output_throughput"] == pytest.approx(48 / result["duration"])
    assert len(result["ttfts"]) == len(result["latencies"]) == len(result["itls"]) == 6
    assert all(0 < t <= e for t, e in zip(result["ttfts"], result["latencies"], strict=True))
    # chunks per request: ar 8, diffusion 2, self_spec 4 -> 2 * 14 chunks for 48 tokens
    assert result["mean_tokens_per_chunk"] == pytest.approx(48 / 28)
    assert sorted(len(g) for g in result["itls"]) == [1, 1, 3, 3, 7, 7]
    per_mode = result["per_mode"]
    assert set(per_mode) == set(SENT)
    assert all(
        m["completed"] == 2 and m["mean_ttft_ms"] > 0 and m["mean_tpot_ms"] > 0 for m in per_mode.values()
    )
    assert per_mode["diffusion"]["mean_tokens_per_chunk"] == pytest.approx(4.0)
    assert result["tokens_per_forward"] == {"ar": 1.0, "diffusion": 4.0, "self_spec": 2.0}
    spec = result["spec_decode"]
    assert spec["num_drafts"] == 8 and spec["num_draft_tokens"] == 24 and spec["num_accepted_tokens"] == 8
    assert spec["acceptance_length"] == pytest.approx(2.0)
    assert spec["acceptance_rate"] == pytest.approx(100 / 3)
    assert result["config"]["api_key"] == "***" and result["config"]["num_prompts"] == 6
    # request bodies: streaming with usage, mode knobs at the top level
    assert len(state.payloads) == 6
    body = state.payloads[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == MODEL and body["max_tokens"] == 8 and body["block_length"] == 4
    assert body["threshold"] == 0.9 and "steps" not in body
    assert sorted(p["mode"] for p in state.payloads) == [
        "ar",
        "ar",
        "diffusion",
        "diffusion",
        "self_spec",
    ] * 1 + ["self_spec"]


def check_layout(text: str) -> list[str]:
    """Assert vllm bench serve's console layout; return the row labels."""
    lines = text.splitlines()
    start = lines.index("============ Serving Benchmark Result ============")
    end = len(lines) - 1 - lines[::-1].index("=" * 50)
    labels = []
    for line in lines[start + 1 : end]:
        if line.startswith("-") and line.endswith("-"):
            assert len(line) == 50, line
            name = line.strip("-")
            assert line.index(name) in ((50 - len(name)) // 2, (51 - len(name)) // 2), line
            continue
        assert len(line) >= 51 and line[40] == " ", line
        label = line[:40].rstrip()
        assert label.endswith(":") and line[41] != " ", line
        labels.append(label)
    return labels


def test_cli_chat_console(server_state: tuple[str, FakeState], capsys: Any) -> None:
    url, state = server_state
    argv = [
        "--base-url", url + "/v1", "--endpoint", "chat", "--num-prompts", "6", "--request-rate", "200",
        "--burstiness", "0.5", "--max-concurrency", "3", "--input-len", "12", "--output-len", "6",
        "--mode-mix", "ar=1,diffusion=1,self_spec=1", "--ignore-eos", "--no-progress", "--steps", "4",
        "--metric-percentiles", "50,99",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    labels = check_layout(out)
    expected = [
        "Successful requests:", "Failed requests:", "Maximum request concurrency:",
        "Request rate configured (RPS):", "Benchmark duration (s):", "Total input tokens:",
        "Total generated tokens:", "Request throughput (req/s):", "Output token throughput (tok/s):",
        "Peak output token throughput (tok/s):", "Peak concurrent requests:",
        "Total token throughput (tok/s):",
        "Mean TTFT (ms):", "Median TTFT (ms):", "P50 TTFT (ms):", "P99 TTFT (ms):",
        "Mean TPOT (ms):", "Median TPOT (ms):", "P50 TPOT (ms):", "P99 TPOT (ms):",
        "Mean ITL (ms):", "Median ITL (ms):", "P50 ITL (ms):", "P99 ITL (ms):", "Mean tokens per chunk:",
        "Mean E2EL (ms):", "Median E2EL (ms):", "P50 E2EL (ms):", "P99 E2EL (ms):",
        "ar:", "diffusion:", "self_spec:", "Tokens per forward (ar):", "Tokens per forward (diffusion):",
        "Tokens per forward (self_spec):", "Acceptance rate (%):", "Acceptance length:", "Drafts:",
        "Draft tokens:", "Accepted tokens:", "Cached prompt tokens (usage):", "Server lookups / hits (tokens):",
        "Hit rate (%):",
    ]  # fmt: skip
    assert labels == expected
    assert "---------------Time to First Token----------------" in out
    assert "-----Time per Output Token (excl. 1st token)------" in out
    assert "---------------Inter-token Latency----------------" in out
    assert "----------------End-to-end Latency----------------" in out
    assert "---------------------Per-mode---------------------" in out
    assert "---------------Speculative Decoding---------------" in out
    rows = {line[:40].rstrip(): line[41:].rstrip() for line in out.splitlines() if len(line) > 41}
    assert rows["Successful requests:"] == "6" and rows["Failed requests:"] == "0"
    assert rows["Request rate configured (RPS):"] == "200.00"
    assert rows["Total generated tokens:"] == "36"
    assert rows["Tokens per forward (diffusion):"] == "3.00"  # 6 tokens in 2 forwards
    assert rows["Acceptance length:"] == "2.00"
    assert rows["Mean tokens per chunk:"] == f"{36 / (2 * (6 + 2 + 3)):.2f}"
    assert rows["ar:"].startswith("2 req, ") and " tok/s, TTFT " in rows["ar:"]
    body = state.payloads[0]
    assert body["messages"][0]["role"] == "user" and body["max_completion_tokens"] == 6
    assert body["ignore_eos"] is True and body["steps"] == 4


def test_failures_and_missing_metrics(server_state: tuple[str, FakeState], tmp_path: Any) -> None:
    url, state = server_state
    state.metrics_enabled = state.tokenize_enabled = False
    ns = argparse.Namespace(
        base_url=url, num_prompts=3, input_len=5, output_len=4, mode_mix="ar=1,bogus=1,broken=1",
        no_progress=True, model=MODEL, save_result=str(tmp_path / "r.json"),
    )  # fmt: skip
    result = asyncio.run(run_benchmark(ns))
    assert result["completed"] == 1 and result["failed"] == 2
    assert len(result["errors"]) == 2
    assert any("unknown mode bogus" in e and "400" in e for e in result["errors"])
    assert any("engine exploded" in e for e in result["errors"])
    assert result["tokenize_used"] is False
    assert result["total_input_tokens"] == 5  # from usage, since /tokenize is gone
    assert result["metrics_scraped"] is False
    assert all(v is None for v in result["spec_decode"].values())
    assert result["tokens_per_forward"] == {"ar": None, "bogus": None, "broken": None}
    assert result["per_mode"]["broken"]["failed"] == 1
    report = format_report(result)
    labels = check_layout(report)
    assert "Maximum request concurrency:" not in labels and "Request rate configured (RPS):" not in labels
    assert "Acceptance length:                       n/a" in report
    assert json.loads((tmp_path / "r.json").read_text())["failed"] == 2


def test_helpers() -> None:
    assert parse_mode_mix("ar=1, diffusion=2,self_spec") == {"ar": 1.0, "diffusion": 2.0, "self_spec": 1.0}
    assert parse_mode_mix(None) == {}
    with pytest.raises(ValueError):
        parse_mode_mix("ar=-1")
    modes = assign_modes("ar=1,diffusion=1,self_spec=1", 6, seed=0)
    assert sorted(modes) == ["ar", "ar", "diffusion", "diffusion", "self_spec", "self_spec"]  # type: ignore[type-var]
    assert modes == assign_modes("ar=1,diffusion=1,self_spec=1", 6, seed=0)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 99) == 0.0
    assert parse_metrics("not { valid") is None

    async def sse() -> list[str]:
        async def lines() -> AsyncIterator[str]:
            for line in [": keep-alive", "", 'data: {"a":', "data: 1}", "", "event: x", "data: [DONE]", ""]:
                yield line

        return [data async for _, data in iter_sse_data(lines())]

    assert asyncio.run(sse()) == ['{"a":\n1}', "[DONE]"]


def test_dataset_file(server_state: tuple[str, FakeState], tmp_path: Any) -> None:
    url, state = server_state
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "one two three", "output_len": 3}, {"prompt": "four five"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = BenchmarkConfig(base_url=url, num_prompts=3, dataset=str(data), output_len=5, no_progress=True)
    result = asyncio.run(run_benchmark(cfg))
    assert result["completed"] == 3
    assert result["total_output_tokens"] == 3 + 5 + 3 and result["total_input_tokens"] == 3 + 2 + 3
    assert [p["prompt"] for p in state.payloads].count("one two three") == 2
    assert all("mode" not in p for p in state.payloads)  # no --mode-mix: the server picks
    assert set(result["per_mode"]) == {"ar"}  # attributed from the chunks' "mode" field


def test_shared_prefix_workload_puts_one_of_k_prefixes_before_each_suffix(server_state: tuple[str, FakeState]) -> None:
    url, state = server_state
    cfg = BenchmarkConfig(base_url=url, num_prompts=4, prefix_len=10, num_prefixes=2, input_len=5, output_len=2,
                          no_progress=True, max_concurrency=1)
    result = asyncio.run(run_benchmark(cfg))
    assert result["completed"] == 4
    words = [p["prompt"].split() for p in state.payloads]
    assert all(len(w) == 15 for w in words)  # the fake tokenizer counts words
    assert words[0][:10] == words[2][:10] and words[1][:10] == words[3][:10] and words[0][:10] != words[1][:10]
    assert len({tuple(w[10:]) for w in words}) == 4  # every suffix its own
    with pytest.raises(ValueError, match="num_prefixes"):
        BenchmarkConfig(num_prefixes=0).validate()


def test_multi_turn_workload_resends_the_conversation_and_reports_by_turn(server_state: tuple[str, FakeState],
                                                                         capsys: Any) -> None:
    url, state = server_state
    argv = ["--base-url", url, "--endpoint", "chat", "--num-prompts", "2", "--multi-turn", "3", "--input-len", "4",
            "--output-len", "3", "--max-concurrency", "2", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Turn 3 (TTFT, prompt, cached):" in out
    assert len(state.payloads) == 6
    last = [p["messages"] for p in state.payloads if len(p["messages"]) == 5]
    assert len(last) == 2
    for messages in last:
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
        assert messages[1]["content"] == " tok tok tok" and len(messages[0]["content"].split()) == 4
    assert all(m[0]["content"] != m[2]["content"] for m in last) and last[0][0] != last[1][0]
    cfg = BenchmarkConfig(base_url=url, endpoint="chat", num_prompts=2, multi_turn=3, input_len=4, output_len=3,
                          no_progress=True)
    result = asyncio.run(run_benchmark(cfg))
    turns = result["multi_turn"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and all(t["completed"] == 2 for t in turns)
    assert turns[0]["hit_rate"] is None  # the first turn reports no cached tokens
    assert turns[1]["mean_cached_tokens"] == 4 and turns[2]["mean_cached_tokens"] == 8
    assert turns[2]["hit_rate"] == pytest.approx(8 / (4 + 3 + 4 + 3 + 4))
    assert result["prefix_cache"]["hits"] == 2 * (4 + 8)
    with pytest.raises(ValueError, match="endpoint chat"):
        BenchmarkConfig(multi_turn=2).validate()
