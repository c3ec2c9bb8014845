"""Benchmark configuration: one dataclass, built from CLI args, a Namespace or keyword arguments."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BenchmarkConfig:
    """Everything one benchmark run needs. Field names match the CLI flags (dashes -> underscores)."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "completions"  # completions | chat
    model: str | None = None  # default: first entry of /v1/models
    num_prompts: int = 100
    request_rate: float = math.inf  # inf = all at t=0; else Poisson / gamma arrivals
    burstiness: float = 1.0  # gamma shape; 1 = Poisson
    max_concurrency: int | None = None
    input_len: int = 128
    output_len: int = 128
    dataset: str | None = None  # jsonl with "prompt" and optional "output_len"
    # shared prefixes (vLLM bench's prefix repetition): every prompt is one of `num_prefixes` random prefixes of
    # `prefix_len` tokens followed by its own random `input_len`-token suffix; 0 = no prefix
    prefix_len: int = 0
    num_prefixes: int = 1
    # multi-turn chat: each of `num_prompts` conversations runs this many turns, re-sending the whole
    # conversation (its earlier replies included) with a new `input_len`-token user message; 0 = single requests
    multi_turn: int = 0
    mode_mix: str | None = None  # e.g. "ar=1,diffusion=1,self_spec=1"; None = let the server choose
    steps: int | None = None
    block_length: int | None = None
    threshold: float | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    seed: int = 0
    save_result: str | None = None
    api_key: str | None = None
    no_progress: bool = False
    tokenize: bool = True  # use the server's POST /tokenize to fit random prompts to input_len
    metric_percentiles: str = "99"  # percentiles shown on the console (JSON always has 50, 90, 99)
    request_timeout: float = 3600.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, obj: Any) -> BenchmarkConfig:
        """Accept a BenchmarkConfig, any dataclass, an argparse Namespace, a mapping or None."""
        if isinstance(obj, cls):
            obj.validate()
            return obj
        if obj is None:
            return cls()
        if isinstance(obj, dict):
            source = obj
        elif dataclasses.is_dataclass(obj):
            source = dataclasses.asdict(obj)  # type: ignore[arg-type]
        else:
            source = vars(obj)
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in source.items() if k in names and v is not None})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError on inconsistent settings."""
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', not {self.endpoint!r}")
        if self.num_prompts < 1:
            raise ValueError("num_prompts must be >= 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0 (use inf for all at once)")
        if not self.burstiness > 0:
            raise ValueError("burstiness must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input_len and output_len must be >= 1")
        if self.prefix_len < 0 or self.num_prefixes < 1:
            raise ValueError("prefix_len must be >= 0 and num_prefixes >= 1")
        if self.multi_turn < 0:
            raise ValueError("multi_turn must be >= 0")
        if self.dataset and (self.prefix_len or self.multi_turn):
            raise ValueError("dataset cannot be combined with prefix_len or multi_turn (random prompts only)")
        if self.multi_turn and self.endpoint != "chat":
            raise ValueError("multi_turn needs endpoint chat")
        parse_mode_mix(self.mode_mix)
        display_percentiles(self.metric_percentiles)

    def to_json(self) -> dict[str, Any]:
        """The config as JSON-safe data, with the API key redacted."""
        data = dataclasses.asdict(self)
        if data.get("api_key"):
            data["api_key"] = "***"
        if math.isinf(self.request_rate):
            data["request_rate"] = "inf"
        return data


def parse_mode_mix(spec: str | None) -> dict[str, float]:
    """Parse ``"ar=1,diffusion=2"`` into weights. Empty or None -> {} (no ``mode`` key is sent)."""
    if not spec or spec.strip().lower() in ("none", "default"):
        return {}
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"bad --mode-mix entry {part!r}")
        try:
            weight = float(value) if sep else 1.0
        except ValueError as exc:
            raise ValueError(f"bad weight in --mode-mix entry {part!r}") from exc
        if weight < 0 or math.isnan(weight):
            raise ValueError(f"negative weight in --mode-mix entry {part!r}")
        weights[name] = weights.get(name, 0.0) + weight
    if weights and sum(weights.values()) <= 0:
        raise ValueError("--mode-mix weights sum to zero")
    return {k: v for k, v in weights.items() if v > 0}


def display_percentiles(spec: str) -> list[float]:
    """Parse ``"50,90,99"`` into floats in (0, 100]."""
    values = [float(p) for p in spec.split(",") if p.strip()]
    for p in values:
        if not 0 < p <= 100:
            raise ValueError(f"percentile {p} out of range (0, 100]")
    return values
