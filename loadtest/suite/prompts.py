"""The suite's prompts: random-word prompts fitted to a token count of the model's own tokenizer, or a jsonl file's
prompts cycled to the count, written as a loadtest jsonl dataset that every run of a part sends."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from loadtest.dataset import fitted_prompt


class LocalTokenizer:
    """:func:`loadtest.dataset.fitted_prompt`'s tokenizer interface over a local HF tokenizer (as the server's
    completions endpoint encodes: ``tokenizer.encode(text)``)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    async def count(self, text: str) -> int:
        return len(self.tok.encode(text))


def load_local_tokenizer(model_dir: str) -> Any:
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    if tok is None:
        raise RuntimeError(f"{model_dir} ships no tokenizer: the suite needs text prompts")
    return tok


def build_prompts(
    tok: Any, n: int, input_len: int, output_len: int, seed: int, path: Path, source: str | None = None
) -> list[dict[str, Any]]:
    """``n`` random-word prompts fitted to ``input_len`` tokens of ``tok`` or, with ``source`` (jsonl with a
    ``prompt`` per line), that file's prompts in order, cycled to ``n``; written as a loadtest jsonl dataset."""
    local = LocalTokenizer(tok)
    if source:
        from loadtest.dataset import load_jsonl

        texts = [r["prompt"] for r in load_jsonl(source)]
        rows = [
            {"prompt": t, "output_len": output_len, "prompt_tokens": len(tok.encode(t))}
            for t in (texts[i % len(texts)] for i in range(n))
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return rows

    async def fit() -> list[tuple[str, int | None]]:
        import random

        return [await fitted_prompt(random.Random(seed * 1_000_003 + i), input_len, local) for i in range(n)]

    rows = [{"prompt": text, "output_len": output_len, "prompt_tokens": count} for text, count in asyncio.run(fit())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows
