"""Orchestration: resolve the model, build prompts, scrape metrics, send requests on schedule, collect."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import httpx

from loadtest import prometheus
from loadtest.client import RequestInput, RequestOutput, build_payload, endpoint_path, send_request
from loadtest.config import BenchmarkConfig, display_percentiles, parse_mode_mix
from loadtest.dataset import RemoteTokenizer, build_requests
from loadtest.metrics import compute_metrics
from loadtest.multiturn import by_turn, run_conversations, user_messages
from loadtest.report import save_result

MAX_ERRORS = 20


def root_url(base_url: str) -> str:
    """Server root (where /metrics and /tokenize live): ``base_url`` without a trailing ``/v1``."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def auth_headers(cfg: BenchmarkConfig) -> dict[str, str]:
    """``Authorization: Bearer`` when an API key is set."""
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


async def first_model(client: httpx.AsyncClient, root: str, headers: dict[str, str]) -> str:
    """The id of the first entry of ``GET /v1/models``."""
    resp = await client.get(root + "/v1/models", headers=headers, timeout=30.0)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{root}/v1/models lists no model")
    return str(data[0]["id"])


async def arrivals(n: int, rate: float, burstiness: float, seed: int) -> AsyncIterator[int]:
    """Yield 0..n-1 on schedule: all at once for rate=inf, else gamma gaps (shape=burstiness, mean 1/rate)."""
    rng = random.Random(seed)
    start = time.perf_counter()
    offset = 0.0
    for i in range(n):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i
        if not math.isinf(rate):
            offset += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, disable: bool) -> Any:
    """A tqdm bar, or a no-op stand-in when disabled or tqdm is missing."""
    if disable:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc="requests", unit="req")


async def dispatch(
    client: httpx.AsyncClient, cfg: BenchmarkConfig, requests: list[RequestInput], model: str, url: str
) -> tuple[list[RequestOutput], float]:
    """Send all requests on the arrival schedule under the concurrency cap; return outputs and duration."""
    headers = auth_headers(cfg)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    bar = progress_bar(len(requests), cfg.no_progress)

    async def one(req: RequestInput) -> RequestOutput:
        payload = build_payload(cfg, req, model)
        if sem is None:
            out = await send_request(client, url, payload, headers, req)
        else:
            async with sem:
                out = await send_request(client, url, payload, headers, req)
        bar.update(1)
        return out

    start = time.perf_counter()
    tasks: list[asyncio.Task[RequestOutput]] = []
    try:
        async for i in arrivals(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed + 7919):
            tasks.append(asyncio.create_task(one(requests[i])))
        outputs = list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    return outputs, time.perf_counter() - start


async def run_benchmark(config: Any) -> dict[str, Any]:
    """Run one benchmark. ``config``: BenchmarkConfig, argparse Namespace, other dataclass or dict.

    Returns the result dict (the --save-result JSON content); writes it too when save_result is set.
    """
    cfg = BenchmarkConfig.coerce(config)
    root = root_url(cfg.base_url)
    headers = auth_headers(cfg)
    conns = (cfg.max_concurrency or cfg.num_prompts) + 4
    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    timeout = httpx.Timeout(cfg.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False, headers=headers) as client:
        model = cfg.model or await first_model(client, root, headers)
        tokenizer = RemoteTokenizer(client, root, enabled=cfg.tokenize)
        url = root + endpoint_path(cfg.endpoint)
        if cfg.multi_turn:
            messages = await user_messages(cfg, tokenizer)
            requests = []
        else:
            requests = await build_requests(cfg, tokenizer)
        before = await prometheus.scrape(client, root)
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        turns: list[dict[str, Any]] | None = None
        if cfg.multi_turn:
            conversations, duration = await run_conversations(client, cfg, messages, model, url, headers)
            outputs = [o for c in conversations for o in c]
            turns = by_turn(conversations)
        else:
            outputs, duration = await dispatch(client, cfg, requests, model, url)
        after = await prometheus.scrape(client, root)

    result: dict[str, Any] = {
        "date": started_at,
        "backend": "openai-chat" if cfg.endpoint == "chat" else "openai",
        "base_url": cfg.base_url,
        "endpoint": endpoint_path(cfg.endpoint),
        "model_id": model,
        "num_prompts": cfg.num_prompts,
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "tokenize_used": tokenizer.enabled and (bool(cfg.multi_turn) or any(r.prompt_len is not None
                                                                            for r in requests)),
    }
    result.update(compute_metrics(outputs, duration, display_percentiles(cfg.metric_percentiles)))
    modes = set(parse_mode_mix(cfg.mode_mix)) | set(result["per_mode"])
    server = prometheus.tokens_per_forward(before, after, model, modes)
    result["tokens_per_forward"] = {m: v["tokens_per_forward"] for m, v in server.items()}
    result["server_counters"] = server
    result["spec_decode"] = prometheus.spec_decode(before, after, model)
    result["prefix_cache"] = prometheus.prefix_cache(before, after, model)
    if turns is not None:
        result["multi_turn"] = turns
    result["metrics_scraped"] = before is not None and after is not None
    result["errors"] = [o.error for o in outputs if not o.success][:MAX_ERRORS]
    result["config"] = cfg.to_json()
    if cfg.save_result:
        save_result(result, cfg.save_result)
    return result
