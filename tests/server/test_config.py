"""Config layers and the CLI: presets load, unknown keys fail, overrides are typed, --help names every field."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from engine.config import EngineConfig
from server.cli import build_parser, overrides_from
from server.config import ServerConfig, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.toml"))


def test_the_presets_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"builtin-cpu.toml", "nemotron-labs-diffusion-3b.toml", "nemotron-labs-diffusion-8b.toml",
            "nemotron-labs-diffusion-14b.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads_into_the_config_dataclasses(path: Path) -> None:
    engine_cfg, server_cfg = load_config(path)
    assert isinstance(engine_cfg, EngineConfig) and isinstance(server_cfg, ServerConfig)
    if path.name.startswith("nemotron"):
        assert engine_cfg.device == "cuda" and engine_cfg.dtype == "bfloat16"
        assert engine_cfg.model.startswith("/models/Nemotron-Labs-Diffusion-")


@pytest.mark.parametrize("text", ["[engine]\nbogus = 1\n", "[server]\nbogus = 1\n", "[other]\nx = 1\n",
                                  "[server]\nport = -3\n", "[engine]\ndefault_mode = 'turbo'\n"])
def test_bad_keys_and_values_are_errors(tmp_path: Path, text: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError):
        load_config(p)


def test_command_line_flags_override_the_preset() -> None:
    args = build_parser().parse_args([
        "serve", "--config", str(CONFIGS[0]), "--port", "9001", "--model", "/m", "--engine.max_num_seqs", "3",
        "--engine.allowed_block_lengths", "[4, 8]", "--server.request_timeout", "2.5", "--server.api_key", "123",
        "--server.queue_timeout", "none"])
    engine_cfg, server_cfg = load_config(args.config, overrides_from(args))
    assert engine_cfg.model == "/m" and engine_cfg.max_num_seqs == 3 and engine_cfg.allowed_block_lengths == (4, 8)
    assert server_cfg.port == 9001 and server_cfg.request_timeout == 2.5 and server_cfg.queue_timeout is None
    assert server_cfg.api_key == "123" and "123" not in repr(server_cfg)


def test_serve_help_documents_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for table, cls in (("engine", EngineConfig), ("server", ServerConfig)):
        for f in fields(cls):
            assert f"--{table}.{f.name}" in text
    for flag in ("--config", "--model", "--host", "--port", "--api-key", "--log-level", "--shutdown-timeout"):
        assert flag in text


def test_api_key_comes_from_the_environment_and_empty_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIMODE_API_KEY", "sk-env")
    assert load_config(None, overrides_from(build_parser().parse_args(["serve"])))[1].api_key == "sk-env"
    monkeypatch.setenv("TRIMODE_API_KEY", "")
    assert load_config(None, overrides_from(build_parser().parse_args(["serve"])))[1].api_key is None
