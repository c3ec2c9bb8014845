"""`trimode bench` runs end to end on the tiny checkpoint: every mode and batch size, a table and JSON rows."""

import json

from engine.bench import main


def test_bench_prints_a_row_per_mode_and_batch_and_writes_json(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", str(tiny_ckpt), "--batch-sizes", "1,3", "--max-tokens", "9", "--repeats", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [(m, b) for m in ("ar", "diffusion", "self_spec") for b in (1, 3)]
    assert all(r["output_tokens"] == 9 * r["batch"] and r["tokens_per_s"] > 0 for r in rows)
    assert capsys.readouterr().out.count("| trimode |") == 6
