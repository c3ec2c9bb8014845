"""`trimode bench` runs end to end on the tiny checkpoint: every mode and batch size, a table and JSON rows."""

import json

import pytest

from bench.forwards import main as forwards_main
from bench.forwards import time_forwards
from bench.offline import main
from engine.config import EngineConfig
from engine.decoding.modes import MODES
from engine.engine import Engine


def test_bench_prints_a_row_per_mode_and_batch_and_writes_json(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_ckpt), "--batch-sizes", "1,3", "--max-tokens", "9", "--repeats", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [(m, b) for m in MODES for b in (1, 3)]
    assert all(r["output_tokens"] == 9 * r["batch"] and r["tokens_per_s"] > 0 for r in rows)
    assert capsys.readouterr().out.count("| trimode |") == 2 * len(MODES)


def test_trimode_bench_runs_the_offline_bench(capsys):
    from trimode_cli import main as cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: trimode bench")


def test_bench_forwards_times_every_kind_and_leaves_the_cache_as_found(tiny_ckpt, capsys):
    ms = forwards_main(["--model", str(tiny_ckpt), "--context", "9", "--block-length", "4", "--repeats", "1",
                        "--batch", "2"])
    assert list(ms) == ["ar decode", "self_spec draft", "self_spec verify", "diffusion denoise", "diffusion commit"]
    assert all(t > 0 for t in ms.values())
    out = capsys.readouterr().out
    assert out.count("x |") == 5 and "self_spec beats ar at batch 2 only above" in out
    engine = Engine(EngineConfig(model=str(tiny_ckpt), device="cpu", num_kv_tokens=256))
    free = engine.num_free_blocks
    time_forwards(engine, 1, 20, 4, 1, calls=1)
    assert engine.num_free_blocks == free  # every block it took came back
    with pytest.raises(ValueError, match="context=300 .* does not fit the KV pool"):
        time_forwards(engine, 1, 300, 4, 1)


def test_bench_auto_planner_prints_each_modes_steps_against_the_cost_model(tmp_path, capsys):
    from bench.auto_planner import main as planner_main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("To be, or not", "Now is the winter")))
    planner_main(["--dataset", str(prompts), "--modes", "ar,auto", "--concurrency", "2", "--requests", "3",
                  "--max-tokens", "5", "--top", "2"])
    out = capsys.readouterr().out
    for mode in ("ar", "auto"):
        assert f"\n{mode}: " in "\n" + out
    assert "(('ar_decode', " in out and "predicted" in out
