"""`python -m server serve` as a real process: SIGTERM drains (503 for new work, in-flight finishes), exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.server.helpers import sse_json
from tests.server_fixtures import free_port, wait_until_healthy

ROOT = Path(__file__).parents[2]


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
        body = {"prompt": "drain me", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True,
                "mode": "diffusion", "steps": 8, "block_length": 8}
        results: list[bytes] = []
        started = threading.Event()  # set by the first stream to get a chunk

        def run() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth, timeout=60) as r:
                parts = []
                for chunk in r.iter_bytes():
                    started.set()
                    parts.append(chunk)
                results.append(b"".join(parts))

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        assert started.wait(30)  # one runs; max_num_seqs 1 keeps the other two admitted but queued
        t0 = time.monotonic()
        while httpx.get(f"{url}/load", timeout=5).json()["server_load"] < 3:
            assert time.monotonic() - t0 < 10, "the three requests were not all admitted"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while httpx.get(f"{url}/ready", timeout=5).status_code != 503:
            assert time.monotonic() - t0 < 2, "readiness did not turn 503"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "new"}, headers=auth, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == 503 and "Retry-After" in r.headers
        assert "in-flight" not in r.text
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
