"""A forward is the unit of failure. One engine forward carries every running request's next forward, whatever its
mode, so an exception inside it fails exactly the requests it carried (a 500 error event, then `[DONE]`), frees
their blocks, and the server serves on. This replaces tests/server/test_reliability.py's
`test_a_real_forward_failure_fails_only_that_batch`, written when each mode's group had forwards of its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from engine.forward import Forward
from server.app import create_app
from server.config import ServerConfig
from tests.server.conftest import make_engine
from tests.server.held_engine import HeldEngine
from tests.server.helpers import metric
from tests.server_fixtures import live_server

LONG = {"prompt": "Long one", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return make_engine(ckpt, num_kv_tokens=4096)


@contextmanager
def serve(engine) -> Iterator[str]:
    with live_server(create_app(engine, ServerConfig())) as url:
        yield url


def test_a_real_forward_failure_fails_the_requests_it_carried_and_the_server_serves_on(engine) -> None:
    with serve(engine) as url, HeldEngine(engine) as held, httpx.Client(timeout=30) as client:
        streams = held.open_streams(client, url, [{**LONG, "mode": "diffusion"}, {**LONG, "max_tokens": 100,
                                                                                   "mode": "ar"}])
        lines = [s.iter_lines() for s in streams]
        for it in lines:
            next(it)
        run = engine.runner.run
        carried: list[set[Forward]] = []

        def flaky(batch, *args, **kwargs):
            kinds = {r.forward for r in batch.requests}
            if Forward.DENOISE not in kinds:
                return run(batch, *args, **kwargs)
            carried.append(kinds)
            del engine.runner.run
            raise RuntimeError("injected denoise failure")

        engine.runner.run = flaky
        held.gate.open()
        for it in lines:  # the diffusion request and the ar one rode in the failing forward: both fail
            rest = [line for line in it if line]
            assert rest[-1] == "data: [DONE]" and '"code":500' in rest[-2] and "injected" in rest[-2]
        assert carried == [{Forward.DENOISE, Forward.AR_DECODE}]
        assert client.get(f"{url}/health").status_code == 200
        for mode in ("diffusion", "ar", "self_spec"):
            assert client.post(f"{url}/v1/completions", json={"prompt": "after", "max_tokens": 3,
                                                               "mode": mode}).status_code == 200
        assert metric(url, "trimode:kv_cache_usage_perc") == 0
