"""`trimode serve --tensor-parallel-size 2`: the openai client in every mode, the same text as one process; a bad
size is a config error; a killed worker fails the engine (open streams end with an error, /health 503, the
engine process ends)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from engine.config import MODES
from server.app import create_app
from server.config import ServerConfig
from tests.server.conftest import engine_config
from tests.server.test_engine_recovery import BODY, poll
from tests.server_fixtures import free_port, live_server, wait_until_healthy

ROOT = Path(__file__).parents[2]


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture(scope="module")
def tp_server(ckpt: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", str(ckpt), "--port", str(port),
         "--tensor-parallel-size", "2", "--engine.device", "cpu", "--engine.num_kv_tokens", "4096"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.parametrize("mode", MODES)
def test_serve_with_two_ranks_answers_the_openai_client_as_one_process(tp_server: str, server: str,
                                                                       mode: str) -> None:
    texts = []
    for url in (tp_server, server):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model=client.models.list().data[0].id, prompt="Once upon a time",
                                        max_tokens=12, temperature=0, extra_body={"mode": mode, "ignore_eos": True})
        assert out.usage.completion_tokens == 12 and out.model_extra["mode"] == mode
        texts.append(out.choices[0].text)
    assert texts[0] == texts[1]


def test_serve_refuses_a_size_that_does_not_divide_the_heads(ckpt: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "server", "serve", "--model", str(ckpt), "--tensor-parallel-size", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "config error" in r.stderr and "tensor_parallel_size=3 does not divide" in r.stderr, r.stderr


def test_a_killed_worker_fails_the_engine_cleanly(ckpt: Path) -> None:
    """SIGKILL rank 1 while a stream is open: the stream ends with an error, /health says 503, the engine process
    ends (no hang in a collective). No respawn is left here, so the state stays put while the test looks (the
    respawn itself is the server's, tested in test_engine_recovery.py)."""
    from server.engine_process import EngineProcess

    eng = EngineProcess(engine_config(ckpt, num_kv_tokens=4096, tensor_parallel_size=2), log_level="critical")
    cfg = ServerConfig(engine_restart_attempts=0)
    with live_server(create_app(eng, cfg)) as url, httpx.Client(timeout=30) as client:
        (worker,) = children(eng.proc.pid)
        with client.stream("POST", f"{url}/v1/completions", json={**BODY, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(worker, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"code":500' in rest[-2]  # the open stream ended with an error
        poll(lambda: client.get(f"{url}/health").status_code == 503, "health stayed 200 with a rank dead")
        # the engine process ends with its rank. The server's own threads may reap it first, and then this thread's
        # is_alive() can still say True (its waitpid gets ECHILD); the exit code, set by whichever thread reaped
        # it, is certain. The bound only stops a hang.
        poll(lambda: eng.proc.exitcode is not None, "the engine process outlived its dead rank")
        assert client.post(f"{url}/v1/completions", json={**BODY, "max_tokens": 4}).status_code == 503
