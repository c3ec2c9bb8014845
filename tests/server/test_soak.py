"""A test-sized soak: ~200 mixed-mode requests, some streamed, some abandoned mid-way; nothing leaks."""

from __future__ import annotations

import asyncio
import random
import resource
import time

import httpx

from engine.decoding.modes import MODES
from tests.server.helpers import scrape


async def _one(client: httpx.AsyncClient, url: str, rng: random.Random, i: int) -> str:
    mode = rng.choice(MODES)
    body = {"prompt": f"soak {i} " + "x" * rng.randint(0, 40), "max_tokens": rng.randint(1, 24), "mode": mode,
            "temperature": rng.choice([0, 0.7]), "n": rng.choice([1, 1, 2]), "ignore_eos": rng.random() < 0.5}
    if mode != "ar":
        body["block_length"] = rng.choice([4, 8])
    if rng.random() < 0.2:
        body["stop"] = ["e", "a"]
    fate = rng.random()
    if rng.random() < 0.5:  # streamed; maybe dropped after a chunk
        body["stream"] = True
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if fate < 0.25 and line.startswith("data: {"):
                    return "dropped"
            return "done"
    try:
        r = await client.post(f"{url}/v1/completions", json=body, timeout=0.05 if fate < 0.15 else 60)
    except httpx.TimeoutException:
        return "timed out"
    assert r.status_code == 200, r.text
    return "done"


def test_a_mixed_soak_with_disconnects_ends_with_nothing_running_and_every_block_free(server: str,
                                                                                     shared_engine) -> None:
    rng = random.Random(1234)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def main() -> list[str]:
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=60) as client:
            async def guarded(i: int) -> str:
                async with sem:
                    return await _one(client, server, rng, i)
            return await asyncio.gather(*(guarded(i) for i in range(200)))

    fates = asyncio.run(main())
    # each request draws all its random choices before its first await, so which requests can only end "done"
    # (streams not dropped, requests without the 0.05 s client timeout) is fixed by the seed, not by timing: over
    # 150 of the 200 with this seed
    assert fates.count("done") > 100 and len(fates) == 200
    deadline = time.monotonic() + 30  # a "does not hang" bound for the aborts of the abandoned requests
    while time.monotonic() < deadline:
        m = scrape(server)
        if m[("trimode:num_requests_running", ())] == 0 and m[("trimode:kv_cache_usage_perc", ())] == 0:
            break
        time.sleep(0.05)
    assert m[("trimode:num_requests_running", ())] == 0 and m[("trimode:num_requests_waiting", ())] == 0
    assert m[("trimode:kv_cache_usage_perc", ())] == 0
    assert httpx.get(f"{server}/load").json() == {"server_load": 0}
    assert httpx.get(f"{server}/health").status_code == 200
    assert shared_engine.num_free_blocks == shared_engine.num_total_blocks  # the engine is idle: safe to read
    assert not shared_engine.has_unfinished()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rss_after - rss_before < 300_000, (rss_before, rss_after)  # KiB
