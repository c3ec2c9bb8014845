"""`python -m server serve` as a real process: SIGTERM drains (503 for new work, in-flight finishes), exit 0.

The engine process is stopped (SIGSTOP) while the requests are admitted and the server is signalled, so they are
certainly still in flight when the drain starts, however fast the machine; SIGCONT then lets them finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.helpers import sse_json
from tests.server_fixtures import free_port, wait_until_healthy

ROOT = Path(__file__).parents[2]
BOUND = 30.0  # seconds: a "does not hang" bound


def _engine_pid(server_pid: int) -> int:
    """The server's engine process (a multiprocessing spawn child), from /proc."""
    children = [int(c) for task in Path(f"/proc/{server_pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    engine = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(engine) == 1, children
    return engine[0]


def _wait_for(check, what: str) -> None:
    stop = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < stop, what
        time.sleep(0.02)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the engine process through /proc")
def test_sigterm_drains_in_flight_requests_then_exits_zero(ckpt: Path) -> None:
    port = free_port()
    key = "sk-drain-secret"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", str(ckpt), "--port", str(port), "--api-key", key,
         "--engine.device", "cpu", "--engine.num_kv_tokens", "4096", "--engine.max_num_seqs", "1",
         "--shutdown-timeout", "60"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        wait_until_healthy(proc, url)
        body = {"prompt": "drain me", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True,
                "mode": "diffusion", "steps": 8, "block_length": 8}
        results: list[bytes] = []

        def run() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth, timeout=60) as r:
                results.append(b"".join(r.iter_bytes()))

        engine = _engine_pid(proc.pid)
        os.kill(engine, signal.SIGSTOP)  # no request can finish until SIGCONT
        threads = [threading.Thread(target=run) for _ in range(3)]
        try:
            for t in threads:
                t.start()
            _wait_for(lambda: httpx.get(f"{url}/load", timeout=5).json()["server_load"] == 3,
                      "the three requests were not all admitted")
            proc.send_signal(signal.SIGTERM)
            _wait_for(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 503, "readiness did not turn 503")
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "new"}, headers=auth, timeout=5)
            assert r.status_code == 503 and r.json()["error"]["code"] == 503 and "Retry-After" in r.headers
            assert "in-flight" not in r.text
        finally:
            os.kill(engine, signal.SIGCONT)
        for t in threads:
            t.join(60)
        assert len(results) == 3
        for raw in results:
            assert sse_json(raw)[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read() if proc.stdout else ""
    assert out.count("request_finished") == 3 and "mode=diffusion" in out
    assert key not in out
