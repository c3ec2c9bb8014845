"""Part 2, ``modes``: the modes (``--modes``, all by default: ar, diffusion, self_spec, auto) on one server at each
concurrency level and sampling temperature (``--mode-temperatures``, 0 and 0.7 by default), in rounds; the crossover
(the first level where ar's output tok/s >= self_spec's), and where auto lands against the better of ar and
self_spec at each level (target: >= ``AUTO_TARGET`` of it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.suite.machine import process_cpu_seconds
from loadtest.suite.measure import bench, log, median, median_run, summarize
from loadtest.suite.settings import Settings, prompts_desc, prompts_for

AUTO_TARGET = 0.95  # auto's output tok/s >= this share of the better of ar and self_spec, at every level


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


def auto_vs_best(table: dict[str, list[dict[str, Any]]], key: str = "output_throughput") -> dict[str, float] | None:
    """Per concurrency (as a string key): auto's `key` (output tok/s) over the better of ar's and self_spec's."""
    if "auto" not in table or not ({"ar", "self_spec"} & set(table)):
        return None
    by_mode = {m: {r["concurrency"]: r.get(key) for r in rows} for m, rows in table.items()}
    out: dict[str, float] = {}
    for c, auto in by_mode["auto"].items():
        best = max((by_mode[m].get(c) or 0.0) for m in ("ar", "self_spec") if m in by_mode)
        if auto is not None and best:
            out[str(c)] = auto / best
    return out


def auto_vs_best_paired(runs: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, float] | None:
    """Per concurrency: the median over rounds of auto's output tok/s over the better of ar's and self_spec's in the
    same round. A round's modes run back to back, seconds apart, so the machine's drift over minutes (other tenants,
    clocks) cancels in each round's ratio; a ratio of per-mode medians can pair a fast round of one mode with a slow
    round of another."""
    if "auto" not in runs or not ({"ar", "self_spec"} & set(runs)):
        return None
    out: dict[str, float] = {}
    for c, rounds in runs["auto"].items():
        ratios = []
        for i, row in enumerate(rounds):
            best = max((runs[m][c][i].get("output_throughput") or 0.0) for m in ("ar", "self_spec") if m in runs
                       and i < len(runs[m][c]))
            if best and row.get("output_throughput") is not None:
                ratios.append(row["output_throughput"] / best)
        if ratios:
            out[str(c)] = median(ratios)
    return out


def round_order(modes: list[str], rnd: int) -> list[str]:
    """The modes' order in round `rnd` (0-based): forward in even rounds, reversed in odd ones, rotated by one
    every two rounds, so that over the rounds each mode runs first, last and after each of the others (a rotation
    alone keeps every mode after the same neighbour; a run can leave the machine warmer or a cache fuller for the
    next). With three modes, six rounds run all six orders."""
    if not modes:
        return []
    base = list(modes) if rnd % 2 == 0 else list(reversed(modes))
    k = (rnd // 2) % len(base)
    return base[k:] + base[:k]


def _summary(s: Settings, runs: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, Any]:
    """One temperature's table (median round per cell), crossover and auto ratios."""
    table: dict[str, list[dict[str, Any]]] = {}
    for mode in s.modes:
        table[mode] = []
        for c in s.concurrencies:
            row = dict(median_run(runs[mode][c]))
            row["rounds_output_throughput"] = [r["output_throughput"] for r in runs[mode][c]]
            per_cpu = [r["tokens_per_server_cpu_second"] for r in runs[mode][c]
                       if r.get("tokens_per_server_cpu_second")]
            row["tokens_per_server_cpu_second"] = median(per_cpu) if per_cpu else None  # median of its rounds
            table[mode].append(row)
    per_round = [
        crossover({m: [runs[m][c][i] for c in s.concurrencies] for m in s.modes}) for i in range(s.mode_rounds)
    ]
    cross = crossover(table)
    ratios = auto_vs_best(table)
    return {
        # the same ratio in output tokens per CPU second of the server's processes: other tenants' load on a shared
        # machine stretches wall time by tens of percent between rounds, and CPU time much less
        "auto_vs_best_per_cpu_second": auto_vs_best(table, "tokens_per_server_cpu_second"),
        "table": table,
        "crossover_concurrency": cross,
        "crossover_note": crossover_note(cross, s.concurrencies),
        "crossover_by_round": per_round,
        "auto_vs_best": ratios,
        "auto_vs_best_paired": auto_vs_best_paired(runs),
        "auto_target_met": None if ratios is None else all(r >= AUTO_TARGET for r in ratios.values()),
    }


def part_modes(s: Settings, model: str, url: str, dataset: Path, server_pid: int | None = None) -> dict[str, Any]:
    # Each round runs every temperature and level with the modes back to back (in an order that varies by round,
    # `round_order`), so that the modes compared at a level were measured within seconds of each other (throughput on
    # a shared machine drifts by tens of percent over minutes); a cell of a table is the median of its rounds, and
    # every round is kept under raw.
    temps = [float(t) for t in s.mode_temperatures]
    runs = {t: {m: {c: [] for c in s.concurrencies} for m in s.modes} for t in temps}
    raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {str(t): {m: {} for m in s.modes} for t in temps}
    for mode in s.modes:
        bench(url, dataset, 2, 2, 4, mode=mode, knobs=s.knobs)  # warm-up
    # every level sends the same prompts (as many as the top level needs), so that concurrency is the only thing
    # that changes along a row: self_spec's acceptance depends on the prompt
    n = max(prompts_for(c, s.per_slot, s.min_prompts) for c in s.concurrencies)
    for rnd in range(s.mode_rounds):
        for t in temps:
            for c in s.concurrencies:
                for mode in round_order(list(s.modes), rnd):
                    cpu0 = process_cpu_seconds(server_pid) if server_pid else None
                    res = bench(url, dataset, n, c, s.output_len, mode=mode, knobs=s.knobs, seed=s.seed,
                                temperature=t)
                    cpu1 = process_cpu_seconds(server_pid) if server_pid else None
                    row = {"concurrency": c, **summarize(res, mode)}
                    if cpu0 is not None and cpu1 is not None and cpu1 > cpu0:
                        row["server_cpu_seconds"] = cpu1 - cpu0
                        row["tokens_per_server_cpu_second"] = (res.get("total_output_tokens") or 0) / (cpu1 - cpu0)
                    log(
                        f"modes: round {rnd + 1}/{s.mode_rounds}: T={t:g} {mode:9s} c={c:<3d} "
                        f"{row['output_throughput']:.1f} tok/s, TTFT {row['mean_ttft_ms']:.0f} ms, TPOT "
                        f"{row['mean_tpot_ms']:.1f} ms, tok/fwd {row['tokens_per_forward']}"
                    )
                    runs[t][mode][c].append(row)
                    raw[str(t)][mode].setdefault(str(c), []).append(res)
    by_temperature = {str(t): _summary(s, runs[t]) for t in temps}
    first = by_temperature[str(temps[0])]
    return {
        "model": model,
        "concurrencies": s.concurrencies,
        "input_len": s.input_len,
        "output_len": s.output_len,
        "knobs": s.knobs,
        "prompts": prompts_desc(s),
        "rounds": s.mode_rounds,
        "temperatures": temps,
        # the first temperature's figures at the top level (the table, crossover and plot of earlier runs)
        **first,
        "by_temperature": by_temperature,
        "plot": "modes.png",
        "raw": raw[str(temps[0])],  # every result of the first temperature; the others' below
        "raw_by_temperature": {t: r for t, r in raw.items() if t != str(temps[0])},
    }
