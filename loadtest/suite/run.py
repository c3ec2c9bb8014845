"""The suite's run (``python -m loadtest.suite``): settings, CPU placement, one trimode server for parts 1-2, each
part started on its own so one failing does not stop the others, and the outputs written after every part."""

from __future__ import annotations

import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loadtest.suite.machine import LoadSampler, cpu_plan, machine_info
from loadtest.suite.measure import log
from loadtest.suite.mixed import part_mixed
from loadtest.suite.modes import part_modes
from loadtest.suite.overhead import part_overhead
from loadtest.suite.prompts import build_prompts, load_local_tokenizer
from loadtest.suite.report import plot_modes, summary_markdown, write_outputs
from loadtest.suite.servers import ServerStartError, trimode_server
from loadtest.suite.settings import Settings, build_parser, prompts_desc, prompts_for, settings_from
from loadtest.suite.vs_transformers import part_transformers
from server.affinity import format_cpu_list


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_model(s: Settings) -> str:
    """The checkpoint of parts 1-2: ``--model`` or the engine's built-in model (SystemExit when that is missing)."""
    if s.model:
        return str(Path(s.model).resolve())
    # engine.engine brings torch: imported here, not at the top, so that `--help` does not wait for it
    from engine.engine import BUILTIN_MODEL, default_model_path

    try:
        return default_model_path()
    except FileNotFoundError:
        raise SystemExit(
            f"{BUILTIN_MODEL} does not exist yet: pass --model PATH (a tri-mode checkpoint with a tokenizer)"
        ) from None


def is_builtin(model: str) -> bool:
    """Whether ``model`` is the engine's built-in checkpoint (the plot's title says when it is not)."""
    from engine.engine import BUILTIN_MODEL

    return Path(model).resolve() == BUILTIN_MODEL.resolve()


def run_part(res: dict[str, Any], name: str, sampler: LoadSampler, fn: Callable[[], dict[str, Any]]) -> None:
    t0 = time.time()
    log(f"part {name}: start (load {os.getloadavg()[0]:.2f})")
    try:
        res[name] = fn()
    except Exception:  # one part failing must not lose the others
        res.setdefault("part_errors", {})[name] = traceback.format_exc()
        log(f"part {name} FAILED:\n{traceback.format_exc()}")
    res.setdefault("load", {})[name] = sampler.window(t0, time.time()) | {"seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s = settings_from(build_parser().parse_args(argv))
    s.out_dir.mkdir(parents=True, exist_ok=True)
    if s.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(s.threads))
    res: dict[str, Any] = {
        "suite": "loadtest.suite",
        "command": shlex.join(["python", "-m", "loadtest.suite", *argv]),
        "started_at": now(),
        "quick": s.quick,
        "settings": s.to_json(),
        "machine": machine_info(s.threads),
    }
    try:
        plan = cpu_plan(s)
    except ValueError as exc:
        raise SystemExit(str(exc).removeprefix("server config: ")) from None
    res["machine"]["cpu_placement"] = (
        f"{plan.describe()}; load generator on {format_cpu_list(plan.api)}" if plan else "none (OS scheduling)")
    if plan is not None and plan.api:
        os.sched_setaffinity(0, plan.api)  # the load generator stays off the engine's CPUs
    sampler = LoadSampler().start()
    try:
        if {"overhead", "modes", "mixed"} & set(s.parts):
            model = resolve_model(s)
            res["model"] = model
            res["model_is_builtin"] = is_builtin(model)
            tok = load_local_tokenizer(model)
            n = max([prompts_for(c, s.per_slot, s.min_prompts) for c in s.concurrencies]
                    + [s.overhead_prompts, s.mixed_prompts])
            dataset = s.out_dir / "prompts-model.jsonl"
            rows = build_prompts(tok, n, s.input_len, s.output_len, s.seed, dataset, s.dataset)
            res["prompts"] = prompts_desc(s)
            server = trimode_server(model, s.out_dir / "logs", s.threads, dtype=s.dtype, engine_cpus=s.engine_cpus)
            log(f"starting trimode serve on {model}")
            try:
                url = server.start(s.startup_timeout)
            except ServerStartError as exc:
                server.stop()
                for part in {"overhead", "modes", "mixed"} & set(s.parts):
                    res.setdefault("part_errors", {})[part] = f"ServerStartError: {exc}"
                url = None
            try:
                if url and "overhead" in s.parts:
                    run_part(
                        res, "overhead", sampler, lambda: part_overhead(s, model, url, dataset, rows, tok, server.pid)
                    )
                    write_outputs(res, s.out_dir)
                if url and "modes" in s.parts:
                    run_part(res, "modes", sampler, lambda: part_modes(s, model, url, dataset, server.pid))
                    if "modes" in res:
                        title = f"{Path(model).name}{'' if res['model_is_builtin'] else ' (not the built-in model)'}"
                        plot_modes(res["modes"], s.out_dir / "modes.png", title)
                    write_outputs(res, s.out_dir)
                if url and "mixed" in s.parts:
                    run_part(res, "mixed", sampler, lambda: part_mixed(
                        model, url, rows, tok, s.mixed_concurrencies, s.mixed_prompts, s.output_len, s.dtype, s.knobs,
                        log))
                    write_outputs(res, s.out_dir)
            finally:
                server.stop()
        if "transformers" in s.parts:

            def part3() -> dict[str, Any]:
                from convert.gguf import smollm2_dir

                smol = Path(s.smollm2).resolve() if s.smollm2 else smollm2_dir()
                levels = s.hf_concurrencies
                n = max(prompts_for(c, s.per_slot, s.min_prompts) for c in levels)
                dataset = s.out_dir / "prompts-smollm2.jsonl"
                rows = build_prompts(
                    load_local_tokenizer(str(smol)), n, s.hf_input_len, s.hf_output_len, s.seed, dataset
                )
                return part_transformers(s, smol, dataset, rows)

            run_part(res, "transformers", sampler, part3)
    finally:
        sampler.stop()
        res["finished_at"] = now()
        res["machine"]["loadavg_end"] = list(os.getloadavg())
        write_outputs(res, s.out_dir)
    print(summary_markdown(res))
    log(
        f"wrote {s.out_dir / 'suite.json'}, {s.out_dir / 'summary.md'}"
        + (f", {s.out_dir / 'modes.png'}" if "modes" in res else "")
    )
    return 1 if res.get("part_errors") else 0
