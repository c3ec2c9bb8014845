"""Engine death and recovery, stalls, and readiness: what /health, /ready and /metrics say, and what comes back.

Every state is made certain rather than waited for: a `StepGate` holds the in-process engine (a stall), a held
`respawn` keeps a killed engine process down while the test looks, and a spy counts the probe forwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.async_engine import AsyncEngine
from server.config import ServerConfig
from tests.server.conftest import engine_config, make_engine
from tests.server.gate import StepGate
from tests.server.helpers import metric, serve
from tests.server_fixtures import free_port, live_server, wait_until_healthy

ROOT = Path(__file__).parents[2]
BODY = {"prompt": "Hello there", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return make_engine(ckpt, num_kv_tokens=4096)


def poll(check: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """Until `check()` holds; `limit` only bounds a hang, the state itself is made certain by the test."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < limit, what
        time.sleep(0.05)


def in_background(fn: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    out: list[httpx.Response] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


# ---- stalls ------------------------------------------------------------------------------------------------------


def test_a_stalled_engine_turns_health_503_until_it_steps_again(engine) -> None:
    gate = StepGate(engine)
    try:
        with serve(engine, stall_timeout=0.5) as url, httpx.Client(timeout=30) as client:
            assert client.get(f"{url}/health").status_code == 200  # idle: silence is not a stall
            t, out = in_background(lambda: httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 4},
                                                      timeout=60))
            assert gate.wait_blocked()  # the engine has the request and cannot step
            poll(lambda: client.get(f"{url}/health").status_code == 503, "a held engine never read as stalled")
            r = client.get(f"{url}/health")
            assert "has not stepped" in r.json()["error"]["message"] and "stall_timeout 0.5s" in r.text
            assert client.get(f"{url}/ready").status_code == 503
            gate.open()
            poll(lambda: client.get(f"{url}/health").status_code == 200, "health did not recover after the steps")
            t.join(60)
            assert out[0].status_code == 200
    finally:
        gate.remove()


# ---- death in a thread: gauges, health, no respawn -----------------------------------------------------------------


def test_a_dead_engine_zeroes_the_gauges_and_a_thread_engine_stays_dead(ckpt: Path) -> None:
    engine = make_engine(ckpt, num_kv_tokens=4096)
    gate = StepGate(engine)
    gate.allow(1)  # the prefill: the request is running, holding KV, when the test reads the gauges
    app = create_app(engine, ServerConfig())
    with live_server(app) as url, httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{url}/v1/completions", json={**BODY, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert gate.wait_blocked()
            assert metric(url, "trimode:num_requests_running") == 1
            assert metric(url, "trimode:kv_cache_usage_perc") > 0

            def boom() -> list:
                raise RuntimeError("injected engine death")

            engine.step = boom  # replaces the gate: the step it holds runs, the next one kills the loop
            gate.remove()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"code":500' in rest[-2]
        assert metric(url, "trimode:num_requests_running") == 0
        assert metric(url, "trimode:num_requests_waiting") == 0
        assert metric(url, "trimode:kv_cache_usage_perc") == 0
        # an in-process engine cannot be respawned: it is lost at once, and without the CLI's exit hook it stays
        # dead, answering 503
        assert app.state.async_engine.engine_lost and app.state.async_engine.restarting is None
        assert client.get(f"{url}/health").json()["error"]["message"] == "The engine is dead."
        assert metric(url, "trimode:engine_restarts_total") == 0


# ---- death of the engine process: respawn, then exit when none is left ---------------------------------------------


def test_a_killed_engine_process_is_respawned_and_serves_again(ckpt: Path) -> None:
    from server.engine_process import EngineProcess

    eng = EngineProcess(engine_config(ckpt, num_kv_tokens=4096), log_level="critical")
    real_respawn, release = eng.respawn, threading.Event()

    def held_respawn() -> None:  # the test decides when the engine comes back
        assert release.wait(60)
        real_respawn()

    eng.respawn = held_respawn  # type: ignore[method-assign]
    cfg = ServerConfig(engine_restart_attempts=2, engine_restart_backoff=0)
    with live_server(create_app(eng, cfg)) as url, httpx.Client(timeout=30) as client:
        assert client.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 4}).status_code == 200
        old_pid = eng.proc.pid
        with client.stream("POST", f"{url}/v1/completions", json={**BODY, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(old_pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"code":500' in rest[-2]  # the request it held failed
        poll(lambda: client.get(f"{url}/health").status_code == 503, "health stayed 200 with the engine dead")
        assert "being restarted (attempt 1 of 2)" in client.get(f"{url}/health").json()["error"]["message"]
        assert metric(url, "trimode:num_requests_running") == 0 and metric(url, "trimode:kv_cache_usage_perc") == 0
        assert client.post(f"{url}/v1/completions", json=BODY).status_code == 503
        release.set()
        poll(lambda: client.get(f"{url}/health").status_code == 200, "the engine process was not respawned", 180)
        assert eng.proc.pid != old_pid and eng.proc.is_alive()
        r = client.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert client.get(f"{url}/ready").status_code == 200
        assert metric(url, "trimode:engine_restarts_total") == 1
    eng.proc.join(10)
    assert not eng.proc.is_alive()


def test_serve_exits_nonzero_when_its_engine_cannot_be_respawned(ckpt: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", str(ckpt), "--port", str(port),
         "--engine.device", "cpu", "--engine.num_kv_tokens", "4096", "--server.engine_restart_attempts", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url)
        pid = next(int(m.group(1)) for line in list(lines) if (m := re.search(r"engine process (\d+) ready", line)))
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    assert any("the engine is lost" in line for line in lines), "".join(lines[-20:])


# ---- readiness: cached and coalesced -------------------------------------------------------------------------------


@contextmanager
def counted_probes(engine) -> Iterator[list[int]]:
    """Count the engine's probe forwards (called on the engine thread)."""
    calls: list[int] = []
    real = engine.probe

    def spy() -> None:
        calls.append(1)
        real()

    engine.probe = spy
    try:
        yield calls
    finally:
        del engine.probe


def test_concurrent_readiness_checks_share_one_probe_forward(engine) -> None:
    async def main() -> int:
        async_engine = AsyncEngine(engine, ready_cache_seconds=0)  # no cache: only the sharing saves forwards
        async_engine.start()
        try:
            with counted_probes(engine) as calls:
                await asyncio.gather(*(async_engine.probe(30) for _ in range(20)))
                first = len(calls)
                await async_engine.probe(30)  # a later call, after the shared one ended, probes again
                return first * 100 + len(calls)
        finally:
            async_engine.stop()

    assert asyncio.run(main()) == 1 * 100 + 2


def test_ready_over_http_costs_one_forward_for_a_burst_and_none_after_a_step(engine) -> None:
    with counted_probes(engine) as calls:
        with serve(engine, ready_cache_seconds=3600) as url:
            async def burst() -> list[int]:
                async with httpx.AsyncClient(timeout=30) as client:
                    rs = await asyncio.gather(*(client.get(f"{url}/ready") for _ in range(30)))
                return [r.status_code for r in rs]

            assert asyncio.run(burst()) == [200] * 30
            assert len(calls) == 1
        with serve(engine, ready_cache_seconds=3600) as url:
            assert httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 2}, timeout=30).status_code == 200
            assert httpx.get(f"{url}/ready", timeout=30).status_code == 200
            assert len(calls) == 1  # the request's steps were forwards: readiness needed no probe of its own
        with serve(engine, ready_cache_seconds=0) as url:
            assert httpx.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 2}, timeout=30).status_code == 200
            assert httpx.get(f"{url}/ready", timeout=30).status_code == 200
            assert len(calls) == 2  # without the cache the same call runs its own probe
