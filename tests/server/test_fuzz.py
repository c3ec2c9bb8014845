"""Schemathesis against the server's own OpenAPI schema, both POST endpoints: a bounded run, zero 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from server.app import create_app
from server.config import ServerConfig
from tests.server.conftest import make_engine
from tests.server_fixtures import live_server


@pytest.fixture(scope="module")
def fuzz_url(ckpt: Path) -> Iterator[str]:
    # a short context keeps every generated request quick
    engine = make_engine(ckpt, num_kv_tokens=2048, max_model_len=48)
    with live_server(create_app(engine, ServerConfig(max_n=2, request_timeout=5))) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzz_url: str):
    return schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")


fuzz = schemathesis.pytest.from_fixture("api_schema").include(method="POST", path_regex="^/v1/")


@fuzz.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_5xx(case, fuzz_url: str) -> None:
    case.call_and_validate(base_url=fuzz_url, checks=[not_a_server_error], timeout=30)


def test_the_server_is_healthy_after_fuzzing(fuzz_url: str) -> None:
    assert httpx.get(f"{fuzz_url}/health").status_code == 200
    assert httpx.get(f"{fuzz_url}/load").json() == {"server_load": 0}
