"""The suite's report: ``summary.md`` (the tables of every part that ran), ``modes.png`` (part 2's plot) and
``suite.json`` (every figure and every raw result)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.suite.mixed import summary_lines as mixed_lines
from loadtest.suite.modes import AUTO_TARGET, crossover_note
from loadtest.suite.overhead import OVERHEAD_TARGET


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def modes_table(part: dict[str, Any], temperature: float, fmt: Any) -> list[str]:
    """Part 2's table at one temperature, its crossover and auto's ratio to the better of ar and self_spec."""
    lines = [
        "",
        f"### Temperature {temperature:g}",
        "",
        "| mode | concurrency | requests | output tok/s | each round | tok per server CPU s | mean TTFT ms "
        "| mean TPOT ms | tokens/forward | self-speculation acceptance length |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, rows in part["table"].items():
        for r in rows:
            each = ", ".join(fmt(x, 0) for x in r.get("rounds_output_throughput", []))
            lines.append(
                f"| {mode} | {r['concurrency']} | {r['completed']}/{r['num_prompts']} | "
                f"{fmt(r['output_throughput'])} | {each} | {fmt(r.get('tokens_per_server_cpu_second'))} | "
                f"{fmt(r['mean_ttft_ms'], 0)} | "
                f"{fmt(r['mean_tpot_ms'])} | {fmt(r['tokens_per_forward'], 2)} | "
                f"{fmt(r.get('acceptance_length'), 2) if mode in ('self_spec', 'auto') else ''} |"
            )
    lines += ["", f"**{part['crossover_note'][0].upper()}{part['crossover_note'][1:]}.**"]
    if part.get("crossover_by_round"):
        lines.append("Crossover by round: " + ", ".join(
            "none" if c is None else str(c) for c in part["crossover_by_round"]) + ".")
    ratios = part.get("auto_vs_best")
    if ratios:
        lines.append(
            "auto / the better of ar and self_spec: " + ", ".join(f"{c}: {r:.2f}x" for c, r in ratios.items())
            + f"; target >= {AUTO_TARGET:.2f}x at every level: **{fmt(part.get('auto_target_met'))}**.")
    paired = part.get("auto_vs_best_paired")
    if paired:
        lines.append("Paired by round (the median of each round's auto / the better of ar and self_spec in that "
                     "round): " + ", ".join(f"{c}: {r:.2f}x" for c, r in paired.items()) + ".")
    cpu = part.get("auto_vs_best_per_cpu_second")
    if cpu:
        lines.append("The same per server CPU second (robust to other processes' load): "
                     + ", ".join(f"{c}: {r:.2f}x" for c, r in cpu.items()) + ".")
    return lines


def summary_markdown(res: dict[str, Any]) -> str:
    lines = [
        "# trimode benchmark suite",
        "",
        f"- command: `{res['command']}`",
        f"- started {res['started_at']}, finished {res.get('finished_at')}",
    ]
    m = res["machine"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in m.get("lscpu", []) if ln.startswith("Model name")), "?")
    lines += [
        f"- machine: {cpu}, {m['cpu_count']} CPUs, torch {m.get('torch_version')}, transformers "
        f"{m.get('transformers_version')}, threads per process: {m['threads']}",
        f"- load average at start: {', '.join(f'{x:.2f}' for x in m['loadavg'])}",
        f"- CPU placement: {m.get('cpu_placement', 'not recorded')}",
    ]
    for part, load in res.get("load", {}).items():
        lines.append(f"- load during {part}: mean {fmt(load['mean'], 2)}, max {fmt(load['max'], 2)}")
    for part, err in res.get("part_errors", {}).items():
        lines.append(f"- **{part} failed**: `{err.splitlines()[0]}`")
    ov = res.get("overhead")
    if ov:
        lines += [
            "",
            f"## 1. Serving overhead ({ov['mode']}, concurrency {ov['concurrency']}, {ov['num_prompts']} "
            f"requests, {ov.get('prompts') or str(ov['input_len']) + '-token prompts'}, {ov['output_len']} out)",
            "",
            "| run | offline tok/s | server tok/s | server / offline | CPU s: offline / server / load generator |",
            "|---|---|---|---|---|",
        ]
        for i, r in enumerate(ov["runs"], 1):
            lines.append(
                f"| {i} | {fmt(r['offline']['output_throughput'])} | "
                f"{fmt(r['server']['output_throughput'])} | {fmt(r['ratio'], 3)} | "
                f"{fmt(r['offline'].get('cpu_seconds'), 2)} / {fmt(r['server'].get('server_cpu_seconds'), 2)} / "
                f"{fmt(r['server'].get('client_cpu_seconds'), 2)} |"
            )
        lines += [
            f"| **best** | **{fmt(ov['offline_output_throughput'])}** | **{fmt(ov['server_output_throughput'])}**"
            f" | **{fmt(ov['ratio'], 3)}** | |",
            "",
            f"Target server >= {OVERHEAD_TARGET:.0%} of offline: **{fmt(ov['meets_target'])}** ({ov['ratio']:.1%}, "
            f"best against best). Paired runs: median {fmt(ov.get('median_paired_ratio'), 3)}, lowest "
            f"{fmt(ov.get('min_paired_ratio'), 3)}. CPU seconds for the same tokens, offline / server process: "
            f"{fmt(ov.get('cpu_ratio'), 3)}; offline / (server + load generator): "
            f"{fmt(ov.get('cpu_ratio_incl_client'), 3)}.",
        ]
    md = res.get("modes")
    if md:
        lines += [
            "",
            f"## 2. Modes ({md['model']}, {md.get('prompts') or str(md['input_len']) + ' in'}, {md['output_len']} out, "
            f"knobs "
            f"{md['knobs'] or 'server defaults'})",
            "",
            f"Median of {md.get('rounds', 1)} round(s); each round runs every temperature and level with the modes "
            "back to back.",
        ]
        temps = md.get("by_temperature") or {str(md.get("temperatures", [0.0])[0]): md}
        for t, part in temps.items():
            lines += modes_table(part, float(t), fmt)
        lines += ["", "![modes](modes.png)"]
    if res.get("mixed"):
        lines += mixed_lines(res["mixed"], fmt)
    tf = res.get("transformers")
    if tf:
        lines += [
            "",
            f"## 3. trimode vs transformers (SmolLM2-135M-Instruct, ar, {tf.get('dtype', 'float32')}, "
            f"{tf['input_len']} in / {tf['output_len']} out)",
            "",
            f"Baseline: **{tf.get('baseline_kind')}**.",
        ]
        if tf.get("transformers_serve_error"):
            lines.append(f"transformers serve error: `{tf['transformers_serve_error'][:600]}`")
        if tf.get("hf_model_dir_note"):
            lines.append(f"Note: {tf['hf_model_dir_note']}.")
        lines += [
            "",
            "| concurrency | trimode tok/s | baseline tok/s | speed-up | trimode TTFT ms | baseline TTFT ms |",
            "|---|---|---|---|---|---|",
        ]
        for c in tf["concurrencies"]:
            t, b = tf["trimode"].get(str(c), {}), tf["baseline"].get(str(c), {})
            lines.append(
                f"| {c} | {fmt(t.get('output_throughput'))} | {fmt(b.get('output_throughput'))} | "
                f"{fmt(tf.get('speedup', {}).get(str(c)), 2)}x | {fmt(t.get('mean_ttft_ms'), 0)} | "
                f"{fmt(b.get('mean_ttft_ms'), 0)} |"
            )
        rounds = {c: v for c, v in (tf.get("round_speedups") or {}).items() if v}
        if tf.get("rounds", 1) > 1 and rounds:
            lines += [
                "",
                f"Each figure is the median of {tf['rounds']} rounds (trimode's sweep, then transformers', one server "
                "at a time). Speed-up of each round's pair: "
                + "; ".join(f"concurrency {c}: " + ", ".join(f"{x:.2f}x" for x in v) for c, v in rounds.items())
                + ".",
            ]
        same = tf.get("same_token_counts") or {}
        if same:
            lines += [
                "",
                f"Same prompt and output token totals on both sides at every level: **{fmt(all(same.values()))}**.",
            ]
        tg = tf.get("targets", {})
        lines += [
            "",
            f"Targets: output tok/s at concurrency {tg.get('throughput_level')} >= 2x: "
            f"**{fmt(tg.get('throughput_met'))}** ({fmt(tg.get('throughput_speedup'), 2)}x); TTFT at "
            f"concurrency {tg.get('ttft_level')} no worse: **{fmt(tg.get('ttft_met'))}** "
            f"(trimode / baseline = {fmt(tg.get('ttft_ratio'), 2)}).",
        ]
    return "\n".join(lines) + "\n"


def plot_modes(modes: dict[str, Any], path: Path, title: str) -> None:
    """Output tok/s, TPOT and TTFT by concurrency, one line per mode (auto's included), one row per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = modes.get("by_temperature") or {str(modes.get("temperatures", [0.0])[0]): modes}
    fig, grid = plt.subplots(len(temps), 3, figsize=(15, 4.6 * len(temps)), squeeze=False)
    panels = (
        ("output_throughput", "output tok/s"),
        ("mean_tpot_ms", "mean TPOT (ms)"),
        ("mean_ttft_ms", "mean TTFT (ms)"),
    )
    for axes, (t, part) in zip(grid, temps.items()):
        for ax, (key, label) in zip(axes, panels):
            for mode, rows in part["table"].items():
                xs = [r["concurrency"] for r in rows if r.get(key) is not None]
                ys = [r[key] for r in rows if r.get(key) is not None]
                style = {"lw": 2.5, "ls": "--"} if mode == "auto" else {}
                line = ax.plot(xs, ys, marker="o", label=mode, **style)[0]
                if key == "output_throughput":
                    for r in rows:
                        if r.get("tokens_per_forward") and r.get(key) is not None:
                            ax.annotate(
                                f"{r['tokens_per_forward']:.2f}",
                                (r["concurrency"], r[key]),
                                fontsize=7,
                                textcoords="offset points",
                                xytext=(0, 6),
                                ha="center",
                                color=line.get_color(),
                            )
            ax.set_xscale("log", base=2)
            ax.set_xticks(modes["concurrencies"], [str(c) for c in modes["concurrencies"]])
            ax.set_xlabel("concurrency (max in-flight requests)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if part.get("crossover_concurrency"):
                ax.axvline(part["crossover_concurrency"], color="grey", ls="--", lw=1)
        axes[0].set_title(f"T={float(t):g}: output tok/s (labels: tokens per forward); "
                          f"{crossover_note(part.get('crossover_concurrency'), modes['concurrencies'])}", fontsize=8)
        axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "suite.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    (out_dir / "summary.md").write_text(summary_markdown(res), encoding="utf-8")
