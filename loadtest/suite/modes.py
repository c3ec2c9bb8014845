"""Part 2, ``modes``: ar, diffusion and self_spec on one server at each concurrency level, in rounds, and the
crossover (the first level where ar's output tok/s >= self_spec's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import MODES
from loadtest.suite.measure import bench, log, median_run, summarize
from loadtest.suite.settings import Settings, prompts_desc, prompts_for


def crossover(table: dict[str, list[dict[str, Any]]]) -> int | None:
    """First concurrency where ar's output tok/s >= self_spec's."""
    ar = {r["concurrency"]: r["output_throughput"] for r in table.get("ar", [])}
    ss = {r["concurrency"]: r["output_throughput"] for r in table.get("self_spec", [])}
    for c in sorted(set(ar) & set(ss)):
        if ar[c] is not None and ss[c] is not None and ar[c] >= ss[c]:
            return c
    return None


def crossover_note(cross: int | None, concurrencies: list[int]) -> str:
    """The crossover in words (the crossover concurrency itself is ``cross``)."""
    if cross is None:
        return f"no crossover: ar stays below self_spec up to concurrency {max(concurrencies)}"
    if cross == min(concurrencies):
        return (
            f"crossover concurrency {cross}: ar's output tok/s is already >= self_spec's at the lowest level "
            f"measured ({cross}), so self_spec wins nowhere in {min(concurrencies)}-{max(concurrencies)}"
        )
    return f"crossover concurrency {cross}: the first level where ar's output tok/s >= self_spec's"


def part_modes(s: Settings, model: str, url: str, dataset: Path) -> dict[str, Any]:
    # Each round runs every level with the three modes back to back, so that the modes compared at a level were
    # measured within seconds of each other (throughput on a shared machine drifts by tens of percent over
    # minutes); a cell of the table is the median of its rounds, and every round is kept under raw.
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {m: {c: [] for c in s.concurrencies} for m in MODES}
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {m: {} for m in MODES}
    for mode in MODES:
        bench(url, dataset, 2, 2, 4, mode=mode, knobs=s.knobs)  # warm-up
    # every level sends the same prompts (as many as the top level needs), so that concurrency is the only thing
    # that changes along a row: self_spec's acceptance depends on the prompt
    n = max(prompts_for(c, s.per_slot, s.min_prompts) for c in s.concurrencies)
    for rnd in range(s.mode_rounds):
        for c in s.concurrencies:
            for mode in MODES:
                res = bench(url, dataset, n, c, s.output_len, mode=mode, knobs=s.knobs, seed=s.seed)
                row = {"concurrency": c, **summarize(res, mode)}
                log(
                    f"modes: round {rnd + 1}/{s.mode_rounds}: {mode:9s} c={c:<3d} {row['output_throughput']:.1f} "
                    f"tok/s, TTFT {row['mean_ttft_ms']:.0f} ms, TPOT {row['mean_tpot_ms']:.1f} ms, tok/fwd "
                    f"{row['tokens_per_forward']}"
                )
                runs[mode][c].append(row)
                raw[mode].setdefault(str(c), []).append(res)
    table: dict[str, list[dict[str, Any]]] = {}
    for mode in MODES:
        table[mode] = []
        for c in s.concurrencies:
            row = dict(median_run(runs[mode][c]))
            row["rounds_output_throughput"] = [r["output_throughput"] for r in runs[mode][c]]
            table[mode].append(row)
    per_round = [
        crossover({m: [runs[m][c][i] for c in s.concurrencies] for m in MODES}) for i in range(s.mode_rounds)
    ]
    cross = crossover(table)
    return {
        "model": model,
        "concurrencies": s.concurrencies,
        "input_len": s.input_len,
        "output_len": s.output_len,
        "knobs": s.knobs,
        "prompts": prompts_desc(s),
        "table": table,
        "crossover_concurrency": cross,
        "crossover_note": crossover_note(cross, s.concurrencies),
        "rounds": s.mode_rounds,
        "crossover_by_round": per_round,
        "plot": "modes.png",
        "raw": raw,
    }
