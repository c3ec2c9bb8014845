"""The engine in its own process (`trimode serve`'s default): same answers as in a thread, and a clean lifetime."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.decoding.modes import MODES
from server.app import create_app
from server.config import ServerConfig
from server.engine_process import EngineProcess
from tests.server.conftest import engine_config
from tests.server.held_process import EventHold
from tests.server.helpers import metric, sse_json
from tests.server_fixtures import live_server

BODY = {"prompt": "Hello there", "max_tokens": 24, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def proc_engine(ckpt: Path):
    from server.engine_process import EngineProcess

    eng = EngineProcess(engine_config(ckpt), log_level="warning")
    yield eng
    if eng.proc.is_alive():  # the app's lifespan stops it; this is the safety net
        eng.stop()


@pytest.fixture(scope="module")
def proc_server(proc_engine) -> Iterator[str]:
    from server.app import create_app
    from server.config import ServerConfig

    with live_server(create_app(proc_engine, ServerConfig(max_n=8))) as url:
        yield url


def _wait_idle(url: str) -> None:
    t0 = time.monotonic()
    while metric(url, "trimode:num_requests_running") or metric(url, "trimode:kv_cache_usage_perc"):
        assert time.monotonic() - t0 < 30, "the engine process did not free the request's blocks"
        time.sleep(0.05)


CAN_HOLD = hasattr(fcntl, "F_SETPIPE_SZ")
UNFINISHED = {**BODY, "max_tokens": 400, "stream": True}  # ar: a token a step, far more than a held engine can run


def _held_engine_process(ckpt: Path, log_level: str) -> tuple[EngineProcess, EventHold]:
    eng = EngineProcess(engine_config(ckpt, num_kv_tokens=4096), log_level=log_level)
    hold = EventHold(eng)
    assert 1 + hold.max_steps_ahead() < UNFINISHED["max_tokens"]
    return eng, hold


@pytest.mark.parametrize("mode", MODES)
def test_process_engine_answers_exactly_as_the_thread_engine(proc_server: str, server: str, mode: str) -> None:
    body = {**BODY, "mode": mode, "n": 2, "seed": 3}
    got = httpx.post(f"{proc_server}/v1/completions", json=body, timeout=60).json()
    want = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
    assert got["usage"] == want["usage"] and got["mode"] == mode
    chunks = sse_json(httpx.post(f"{proc_server}/v1/completions", json={**body, "n": 1, "stream": True},
                                 timeout=60).content)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want["choices"][0]["text"]


def test_process_engine_validates_in_the_server_process_and_probes_the_model(proc_server: str) -> None:
    r = httpx.post(f"{proc_server}/v1/completions", json={**BODY, "mode": "diffusion", "steps": 99})
    assert r.status_code == 400 and "steps" in r.json()["error"]["message"]
    r = httpx.post(f"{proc_server}/v1/completions", json={**BODY, "max_tokens": 100000})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    assert httpx.get(f"{proc_server}/ready", timeout=30).json() == {"status": "ready"}
    assert httpx.get(f"{proc_server}/v1/models").json()["data"][0]["max_model_len"] > 0


@pytest.mark.skipif(not CAN_HOLD, reason="holds the engine process through its event pipe's size (Linux)")
def test_process_engine_frees_blocks_when_a_client_disconnects(ckpt: Path) -> None:
    eng, hold = _held_engine_process(ckpt, "warning")
    with live_server(create_app(eng, ServerConfig())) as url:
        hold.hold_after_next_token()
        with httpx.stream("POST", f"{url}/v1/completions", json=UNFINISHED, timeout=30) as r:
            assert next(r.iter_lines()).startswith("data: ")
            assert hold.held.wait(30) and metric(url, "trimode:kv_cache_usage_perc") > 0
        # the client is gone; the engine process, held, cannot have finished the request: only the Abort frees it
        t0 = time.monotonic()
        while metric(url, "trimode:http_requests_client_disconnected_total") < 1:
            assert time.monotonic() - t0 < 30, "the disconnect was not noticed"
            time.sleep(0.02)
        hold.release()
        _wait_idle(url)
        assert metric(url, "trimode:request_success_total", mode="ar", finished_reason="abort") == 1


def test_a_bad_checkpoint_fails_startup_with_the_loader_error(tmp_path: Path) -> None:
    from server.engine_process import EngineProcess

    with pytest.raises(FileNotFoundError, match="config.json"):
        EngineProcess(engine_config(tmp_path), log_level="error")


@pytest.mark.skipif(not CAN_HOLD, reason="holds the engine process through its event pipe's size (Linux)")
def test_a_killed_engine_process_fails_open_streams_and_health(ckpt: Path) -> None:
    eng, hold = _held_engine_process(ckpt, "critical")
    # no respawn: the dead engine stays dead for the checks below, however long they take
    with live_server(create_app(eng, ServerConfig(engine_restart_attempts=0))) as url, \
            httpx.Client(timeout=30) as client:
        hold.hold_after_next_token()
        with client.stream("POST", f"{url}/v1/completions", json=UNFINISHED) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert hold.held.wait(30)  # the request cannot finish before the kill: it lands mid-stream
            os.kill(eng.proc.pid, signal.SIGKILL)
            hold.release()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"code":500' in rest[-2]
        assert client.get(f"{url}/health").status_code == 503
        r = client.post(f"{url}/v1/completions", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
    assert not eng.proc.is_alive()


def test_stopping_the_server_stops_the_engine_process(ckpt: Path) -> None:
    from server.app import create_app
    from server.engine_process import EngineProcess

    eng = EngineProcess(engine_config(ckpt, num_kv_tokens=4096), log_level="error")
    with live_server(create_app(eng)) as url:
        assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=30).status_code == 200
        assert eng.proc.is_alive()
    eng.proc.join(10)
    assert eng.proc.exitcode == 0
