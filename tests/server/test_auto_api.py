"""`mode: "auto"` over the API: the mode echoed, `steps` refused by name, iterations counted in /metrics by choice,
and the request's log line saying how it was decoded."""

from __future__ import annotations

import logging
import re

import httpx
import pytest

from tests.server.helpers import metric, sse_json

BODY = {"prompt": "Once upon", "max_tokens": 10, "temperature": 0, "ignore_eos": True, "mode": "auto"}


def test_auto_is_echoed_in_responses_and_chunks(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", json=BODY, timeout=60).json()
    assert r["mode"] == "auto" and r["usage"]["completion_tokens"] == 10
    ar = httpx.post(f"{server}/v1/completions", json={**BODY, "mode": "ar"}, timeout=60).json()
    assert r["choices"][0]["text"] == ar["choices"][0]["text"]  # greedy auto == greedy ar
    chunks = sse_json(httpx.post(f"{server}/v1/completions", json={**BODY, "stream": True}, timeout=60).content)
    assert chunks and all(c["mode"] == "auto" for c in chunks)


@pytest.mark.parametrize("endpoint,body", [
    ("completions", {"prompt": "x"}),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
])
def test_steps_with_auto_is_a_400_naming_steps(server: str, endpoint: str, body: dict) -> None:
    r = httpx.post(f"{server}/v1/{endpoint}", json={**body, "mode": "auto", "steps": 4, "max_tokens": 4},
                   timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "steps" and "auto" in err["message"], r.text


def test_iterations_are_counted_by_choice_and_logged(server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trimode.server")
    before = {c: metric(server, "trimode:auto_iterations_total", chosen=c) for c in ("ar", "self_spec")}
    r = httpx.post(f"{server}/v1/completions", json={**BODY, "max_tokens": 24, "n": 2}, timeout=60).json()
    after = {c: metric(server, "trimode:auto_iterations_total", chosen=c) for c in ("ar", "self_spec")}
    line = next(rec.getMessage() for rec in caplog.records
                if rec.getMessage().startswith("request_finished") and r["id"] in rec.getMessage())
    decoded = re.search(r" decoded=(\S+) ", line).group(1).split(";")
    assert len(decoded) == 2  # one entry per sequence (n = 2)
    counts = {"ar": 0, "self_spec": 0}
    for entry in decoded:
        for part in entry.split(","):
            name, value = part.split(":")
            counts["ar" if name == "ar" else "self_spec"] += int(value)
    # every iteration of the two sequences is in the log line and in the counters: 23 tokens each after the
    # prefill's first, so at least one iteration each
    assert counts == {c: after[c] - before[c] for c in counts} and sum(counts.values()) >= 2
