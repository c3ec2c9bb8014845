"""The benchmark suite's mixed part against a live trimode server (a tiny random checkpoint): the 1:1:1 mix against
each mode alone, weight passes from the server's /metrics, greedy texts compared, the offline forward count, and the
summary section. The figures' values are the engine tests' business (tests/test_merged_forward.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.prometheus import parse_metrics
from loadtest.suite.measure import log
from loadtest.suite.mixed import MIX, part_mixed, weight_passes
from loadtest.suite.prompts import build_prompts, load_local_tokenizer
from loadtest.suite.report import fmt, summary_markdown
from loadtest.suite.settings import build_parser, settings_from
from tests.server_fixtures import live_server, write_served_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_served_checkpoint(tmp_path_factory.mktemp("mixed-ckpt"))


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[str]:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from server.app import create_app
    from server.config import ServerConfig

    engine = Engine(EngineConfig(model=str(ckpt), device="cpu", num_kv_tokens=4096, max_num_seqs=16))
    with live_server(create_app(engine, ServerConfig(log_level="warning"))) as url:
        yield url


def test_mixed_part_compares_the_mix_with_each_mode_alone(server: str, ckpt: Path, tmp_path: Path) -> None:
    tok = load_local_tokenizer(str(ckpt))
    rows = build_prompts(tok, 6, 10, 6, 0, tmp_path / "prompts.jsonl")
    mx = part_mixed(str(ckpt), server, rows, tok, [3, 6], 6, 6, "float32", {}, log)
    off = mx["offline"]
    assert off["same_tokens"] and set(off["alone_forwards"]) == set(MIX)
    assert off["mixed_forwards"] < off["alone_forwards_total"] and off["ratio"] == pytest.approx(
        off["mixed_forwards"] / off["alone_forwards_total"])
    assert [lv["concurrency"] for lv in mx["levels"]] == [3, 6]
    for lv in mx["levels"]:
        m = lv["mixed"]
        assert m["completed"] == 6 and m["total_output_tokens"] == 36, m["errors"]
        assert set(m["tpot_ms_by_mode"]) == set(MIX)
        assert lv["same_texts"] and lv["num_different_texts"] == 0
        assert [a["concurrency"] for a in lv["alone"].values()] == [lv["concurrency"] // 3] * 3
        assert sum(a["generation_tokens"] for a in lv["alone"].values()) == m["generation_tokens"] == 36
        assert 0 < m["weight_passes"] < sum(a["weight_passes"] for a in lv["alone"].values())
        assert lv["weight_pass_ratio"] == pytest.approx(m["weight_passes_per_token"]
                                                        / lv["alone_weight_passes_per_token"])
    md = summary_markdown({"command": "c", "started_at": "t0", "machine": {"cpu_count": 2, "threads": 1,
                           "loadavg": [0, 0, 0]}, "mixed": mx})
    assert "## Mixed modes (6 requests, 6 out" in md
    assert f"| 3 | mix | {fmt(mx['levels'][0]['mixed']['output_throughput'])} |" in md
    assert "| 6 | diffusion alone at 2 |" in md


def test_weight_passes_come_from_model_forwards_or_from_an_older_servers_batch_sizes() -> None:
    new = ('trimode:model_forwards_total{model_name="m"} %d\n'
           'trimode:batch_size_count{forward_kind="ar_decode",model_name="m"} %d\n'
           'trimode:batch_size_count{forward_kind="denoise",model_name="m"} %d\n')
    before, after = parse_metrics(new % (10, 7, 6)), parse_metrics(new % (15, 12, 9))
    assert weight_passes(before, after, "m") == 5  # one forward carried both kinds: the counter, not their sum
    old = new.split("\n", 1)[1]  # a server from before trimode:model_forwards_total: one kind per forward
    assert weight_passes(parse_metrics(old % (7, 6)), parse_metrics(old % (12, 9)), "m") == 8
    assert weight_passes(None, after, "m") is None


def test_mixed_part_flags() -> None:
    s = settings_from(build_parser().parse_args([]))
    assert "mixed" in s.parts and s.mixed_concurrencies == [3, 6, 12] and s.mixed_prompts == 48
    q = settings_from(build_parser().parse_args(["--quick", "--mixed-concurrencies", "3,9"]))
    assert q.mixed_concurrencies == [3, 9] and q.mixed_prompts == 6
    with pytest.raises(SystemExit, match="--mixed-prompts"):
        settings_from(build_parser().parse_args(["--mixed-prompts", "10"]))
