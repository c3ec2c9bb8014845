"""Prompts (seeded random text of ~input_len tokens, or a jsonl dataset) and the mode of each request."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx

from loadtest.client import RequestInput
from loadtest.config import BenchmarkConfig, parse_mode_mix

# Short, common English words: almost all are one token (with their leading space) in BPE vocabularies.
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        """the of and to in is was for on that with as by at from his he it an were are which this be or
    has had not but first one their its new after who they have her she two been other when there all
    during into school time may years more most only over city some world would where later up such used
    many can state about national out known university united then made year him under three four five
    team part also well like water house world game music book river light power field water north south
    east west young small large early long great high city area group line place play point right hand
    life day night home work word back side head name end case fact week month money story book job land
    road open close green blue red white black cold warm hard soft fast slow good bad old free full
    true""".split()
    )
)


class RemoteTokenizer:
    """Counts tokens with the server's ``POST /tokenize``; disables itself after the first failure."""

    def __init__(self, client: httpx.AsyncClient, root_url: str, enabled: bool = True) -> None:
        self.client = client
        self.url = root_url.rstrip("/") + "/tokenize"
        self.enabled = enabled
        self._sem = asyncio.Semaphore(16)

    async def count(self, text: str) -> int | None:
        """Token count of ``text``, or None when /tokenize is unavailable."""
        if not self.enabled:
            return None
        try:
            async with self._sem:
                resp = await self.client.post(self.url, json={"prompt": text}, timeout=30.0)
            resp.raise_for_status()
            body = resp.json()
            if "count" in body:
                return int(body["count"])
            return len(body["tokens"])
        except Exception:  # missing endpoint, bad JSON, timeout: fall back to word counts
            self.enabled = False
            return None


def random_words(rng: random.Random, n: int) -> list[str]:
    """``n`` words drawn from :data:`WORDS` with ``rng``."""
    return [rng.choice(WORDS) for _ in range(n)]


async def fitted_prompt(
    rng: random.Random, target: int, tokenizer: RemoteTokenizer | None, max_rounds: int = 4
) -> tuple[str, int | None]:
    """A prompt of about ``target`` tokens: one word per token, refined with /tokenize when available.

    Returns the text and its server-side token count (None when /tokenize is unavailable).
    """
    pool = random_words(rng, target * 2 + 16)
    n_words = target
    best: tuple[str, int | None] = (" ".join(pool[:n_words]), None)
    for _ in range(max_rounds):
        if len(pool) < n_words:
            pool.extend(random_words(rng, n_words - len(pool) + 16))
        text = " ".join(pool[:n_words])
        count = await tokenizer.count(text) if tokenizer is not None else None
        if count is None:
            break
        if best[1] is None or abs(count - target) < abs(best[1] - target):
            best = (text, count)
        if count == target or count <= 0:
            break
        new = max(1, round(n_words * target / count))
        if new == n_words:
            new = max(1, n_words + (1 if count < target else -1))
        n_words = new
    return best


def load_jsonl(path: str) -> list[dict[str, Any]]:
    """Rows of a jsonl file that have a string ``prompt``."""
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: each line needs a string 'prompt'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def assign_modes(mode_mix: str | None, n: int, seed: int) -> list[str | None]:
    """Modes for ``n`` requests: counts proportional to the weights (largest remainder), shuffled."""
    weights = parse_mode_mix(mode_mix)
    if not weights:
        return [None] * n
    total = sum(weights.values())
    exact = {m: n * w / total for m, w in weights.items()}
    counts = {m: int(v) for m, v in exact.items()}
    by_remainder = sorted(weights, key=lambda m: (-(exact[m] - counts[m]), list(weights).index(m)))
    for m in by_remainder[: n - sum(counts.values())]:
        counts[m] += 1
    modes: list[str | None] = [m for m in weights for _ in range(counts[m])]
    random.Random(seed).shuffle(modes)
    return modes


async def build_requests(cfg: BenchmarkConfig, tokenizer: RemoteTokenizer | None) -> list[RequestInput]:
    """All requests of the run, deterministic for a given seed (and tokenizer)."""
    modes = assign_modes(cfg.mode_mix, cfg.num_prompts, cfg.seed)
    if cfg.dataset:
        rows = load_jsonl(cfg.dataset)
        picked = [rows[i % len(rows)] for i in range(cfg.num_prompts)]
        counts = await asyncio.gather(
            *(tokenizer.count(r["prompt"]) if tokenizer else _none() for r in picked)
        )
        return [
            RequestInput(
                index=i,
                prompt=row["prompt"],
                output_len=int(row.get("output_len") or cfg.output_len),
                prompt_len=counts[i],
                mode=modes[i],
            )
            for i, row in enumerate(picked)
        ]
    fitted = await asyncio.gather(
        *(
            fitted_prompt(random.Random(cfg.seed * 1_000_003 + i), cfg.input_len, tokenizer)
            for i in range(cfg.num_prompts)
        )
    )
    if cfg.prefix_len:
        return await _with_prefixes(cfg, tokenizer, fitted, modes)
    return [
        RequestInput(index=i, prompt=text, output_len=cfg.output_len, prompt_len=count, mode=modes[i])
        for i, (text, count) in enumerate(fitted)
    ]


async def _with_prefixes(cfg: BenchmarkConfig, tokenizer: RemoteTokenizer | None,
                         suffixes: list[tuple[str, int | None]], modes: list[str | None]) -> list[RequestInput]:
    """Request i: prefix i % num_prefixes, a space, then its own suffix (words split on spaces, so the prefix
    tokenizes the same in every prompt and a prefix cache can reuse it)."""
    prefixes = await asyncio.gather(
        *(fitted_prompt(random.Random(cfg.seed * 7_000_003 + 104_729 * j), cfg.prefix_len, tokenizer)
          for j in range(cfg.num_prefixes))
    )
    prompts = [prefixes[i % cfg.num_prefixes][0] + " " + text for i, (text, _) in enumerate(suffixes)]
    counts = await asyncio.gather(*(tokenizer.count(p) if tokenizer else _none() for p in prompts))
    return [
        RequestInput(index=i, prompt=p, output_len=cfg.output_len, prompt_len=counts[i], mode=modes[i])
        for i, p in enumerate(prompts)
    ]


async def _none() -> None:
    return None
