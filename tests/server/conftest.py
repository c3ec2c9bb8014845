"""Fixtures for the server tests: a tiny random tri-mode checkpoint with a char tokenizer, served live."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.server_fixtures import live_server, write_served_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_served_checkpoint(tmp_path_factory.mktemp("trimode-test"))


def engine_config(ckpt: Path, **over):
    """The test servers' EngineConfig for `ckpt` (CPU, small pool), with overrides."""
    from engine.config import EngineConfig

    cfg = dict(model=str(ckpt), device="cpu", num_kv_tokens=8192, max_num_seqs=32, max_num_batched_tokens=1024)
    cfg.update(over)
    return EngineConfig(**cfg)


def make_engine(ckpt: Path, **over):
    from engine.engine import Engine

    return Engine(engine_config(ckpt, **over))


@pytest.fixture(scope="session")
def shared_engine(ckpt: Path):
    return make_engine(ckpt)


@pytest.fixture(scope="session")
def server(shared_engine) -> Iterator[str]:
    """One live server shared by the read-mostly tests; yields its base URL."""
    from server.app import create_app
    from server.config import ServerConfig

    app = create_app(shared_engine, ServerConfig(max_n=8))
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    """The openai client on the shared server (no retries: a test sees every error)."""
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
