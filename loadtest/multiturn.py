"""Multi-turn chat workload: conversations that re-send their whole history every turn (as chat clients do), so a
server's prefix cache can serve each turn's earlier turns. Figures by turn: TTFT, prompt and cached tokens.

Every user message is a random ``input_len``-token text fitted before the clock starts; each assistant message is
the text the server streamed back. ``max_concurrency`` bounds the conversations in flight (a conversation holds
its slot from its first turn to its last), and all conversations start at once: ``request_rate`` does not apply.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx

from loadtest.client import RequestInput, RequestOutput, build_payload, send_request
from loadtest.config import BenchmarkConfig
from loadtest.dataset import RemoteTokenizer, assign_modes, fitted_prompt
from loadtest.metrics import mean_or_none


async def user_messages(cfg: BenchmarkConfig, tokenizer: RemoteTokenizer | None) -> list[list[str]]:
    """Per conversation, its ``multi_turn`` user messages (deterministic for a seed)."""
    fitted = await asyncio.gather(*(
        fitted_prompt(random.Random(cfg.seed * 1_000_003 + c * 1009 + t), cfg.input_len, tokenizer)
        for c in range(cfg.num_prompts) for t in range(cfg.multi_turn)))
    texts = [text for text, _ in fitted]
    return [texts[c * cfg.multi_turn:(c + 1) * cfg.multi_turn] for c in range(cfg.num_prompts)]


async def run_conversations(client: httpx.AsyncClient, cfg: BenchmarkConfig, messages: list[list[str]], model: str,
                            url: str, headers: dict[str, str]) -> tuple[list[list[RequestOutput]], float]:
    """Every conversation, turn after turn (a failed turn ends its conversation); outputs per conversation and
    the run's duration."""
    sem = asyncio.Semaphore(cfg.max_concurrency or len(messages))
    modes = assign_modes(cfg.mode_mix, len(messages), cfg.seed)

    async def conversation(c: int) -> list[RequestOutput]:
        history: list[dict[str, str]] = []
        outs: list[RequestOutput] = []
        async with sem:
            for t, text in enumerate(messages[c]):
                history.append({"role": "user", "content": text})
                req = RequestInput(index=c * cfg.multi_turn + t, prompt=text, output_len=cfg.output_len,
                                   mode=modes[c], messages=list(history))
                out = await send_request(client, url, build_payload(cfg, req, model), headers, req)
                outs.append(out)
                if not out.success:
                    break
                history.append({"role": "assistant", "content": out.generated_text})
        return outs

    start = time.perf_counter()
    conversations = await asyncio.gather(*(conversation(c) for c in range(len(messages))))
    return list(conversations), time.perf_counter() - start


def by_turn(conversations: list[list[RequestOutput]]) -> list[dict[str, Any]]:
    """Per turn (1-based): completed requests, mean TTFT (ms), mean prompt and cached tokens, and the share of
    that turn's prompt tokens the server reported cached (None where it reports no cached tokens)."""
    turns = max((len(c) for c in conversations), default=0)
    rows = []
    for t in range(turns):
        ok = [c[t] for c in conversations if len(c) > t and c[t].success]
        cached = [o.cached_tokens for o in ok if o.cached_tokens is not None]
        prompt = sum(o.prompt_tokens for o in ok if o.cached_tokens is not None)
        rows.append({
            "turn": t + 1,
            "completed": len(ok),
            "mean_ttft_ms": (mean_or_none([o.ttft for o in ok]) or 0.0) * 1000 if ok else None,
            "mean_prompt_tokens": mean_or_none([float(o.prompt_tokens) for o in ok]),
            "mean_cached_tokens": mean_or_none([float(x) for x in cached]),
            "hit_rate": sum(cached) / prompt if cached and prompt else None,
        })
    return rows
