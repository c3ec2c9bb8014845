"""OpenAI `logprobs` objects from the engine's per-token `Logprob`s.

Completions (legacy shape): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, where each
`top_logprobs` entry maps the top-N token strings and the sampled one to their logprobs (so up to N + 1 keys, as
OpenAI documents); with `echo` the prompt's tokens come first, the very first with null logprobs. Chat:
`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...N]}]}`. A token's string is its own decode,
special tokens spelled out (`</s>`) though the text skips them; `text_offset` counts only the characters the text
shows. Without a tokenizer a token is `token_id:ID` (vLLM's spelling).
"""

from __future__ import annotations

from typing import Any

from engine.sequence import Logprob

TokenLogprob = tuple[int, Logprob | None]  # (token id, its Logprob; None for a prompt's first token)


def token_text(tokenizer: Any, token_id: int) -> str:
    return f"token_id:{token_id}" if tokenizer is None else tokenizer.decode([token_id])


def completion_logprobs(tokenizer: Any, items: list[TokenLogprob], offset: int,
                        as_ids: bool = False) -> tuple[dict[str, list[Any]], int]:
    """The completions object for `items`, text offsets counted from `offset` (characters before them), and the
    offset after them. `as_ids` (vLLM's return_tokens_as_token_ids): tokens spelled `token_id:ID`."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    hidden = set(tokenizer.all_special_ids) if tokenizer is not None else set()  # spelled out, not in the text
    label = tokenizer if not as_ids else None
    for tid, lp in items:
        shown = token_text(tokenizer, tid)
        text = token_text(label, tid)
        top = None
        if lp is not None:
            top = {token_text(label, t): v for t, v in lp.top}
            top.setdefault(text, lp.logprob)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if lp is None else lp.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += 0 if tokenizer is None or tid in hidden else len(shown)
    return out, offset


def chat_logprobs(tokenizer: Any, items: list[TokenLogprob], as_ids: bool = False) -> dict[str, list[dict[str, Any]]]:
    def entry(tid: int, value: float) -> dict[str, Any]:
        text = token_text(None if as_ids else tokenizer, tid)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return {"content": [dict(entry(tid, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for tid, lp in items]}
