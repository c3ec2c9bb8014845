"""Request fields -> the engine's sampling controls, and the vLLM extensions' response pieces.

`control_kwargs` maps the penalties, `logit_bias`, `min_tokens`, `min_p`, `allowed_token_ids` and `bad_words` onto
SamplingParams (bad words become token sequences, both as written and after a space, as vLLM tokenizes them);
`prompt_logprobs_field` renders vLLM's `prompt_logprobs` (per prompt token: null for the first, else token id ->
{logprob, rank, decoded_token}); `truncate` keeps a prompt's last (or first) `truncate_prompt_tokens` tokens.
"""

from __future__ import annotations

import math
from typing import Any

from engine.errors import InvalidParam
from engine.sequence import Logprob

MAX_LOGIT_BIAS = 1024  # entries; bounds only keep a hostile body cheap
MAX_BAD_WORDS = 256


def logit_bias(raw: dict[str, Any] | None) -> tuple[tuple[int, float], ...]:
    """`{"token id": bias}` -> ((id, bias), ...); InvalidParam("logit_bias") for a key that is not an integer or
    a value that is not a finite number (the range is SamplingParams')."""
    if not raw:
        return ()
    if len(raw) > MAX_LOGIT_BIAS:
        raise InvalidParam("logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(raw)}")
    out = []
    bad_keys = []
    for key, value in raw.items():
        try:
            tid = int(key)
        except ValueError:
            bad_keys.append(key[:50])
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidParam("logit_bias", f"logit_bias values must be numbers, got {str(value)[:50]!r} for {tid}")
        out.append((tid, float(value)))
    if bad_keys:  # every bad key at once (a client fixes them in one go), a handful at most
        shown = ", ".join(repr(k) for k in bad_keys[:10]) + (", ..." if len(bad_keys) > 10 else "")
        raise InvalidParam("logit_bias", f"logit_bias keys must be token ids, got {shown}")
    return tuple(out)


def bad_words_ids(tokenizer: Any, words: list[str] | None) -> tuple[tuple[int, ...], ...]:
    """Each bad word's token sequences: as written and with a leading space (the same word mid-text), as vLLM."""
    if not words:
        return ()
    if len(words) > MAX_BAD_WORDS:
        raise InvalidParam("bad_words", f"at most {MAX_BAD_WORDS} bad_words are allowed, got {len(words)}")
    if tokenizer is None:
        raise InvalidParam("bad_words", "this model ships no tokenizer: bad_words needs one")
    out: dict[tuple[int, ...], None] = {}
    for word in words:
        if not word.strip():
            raise InvalidParam("bad_words", "bad_words must not hold an empty word")
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                out[ids] = None
    return tuple(out)


def control_kwargs(req: Any, tokenizer: Any) -> dict[str, Any]:
    """The SamplingParams keyword arguments of a request's sampling controls (InvalidParam naming a bad field)."""
    return {
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "logit_bias": logit_bias(req.logit_bias),
        "min_tokens": req.min_tokens,
        "min_p": req.min_p or 0.0,
        "allowed_token_ids": None if req.allowed_token_ids is None else tuple(req.allowed_token_ids),
        "bad_words_token_ids": bad_words_ids(tokenizer, req.bad_words),
    }


def truncate(ids: list[int], keep: int | None, side: str | None = None) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: the prompt's last `keep` tokens (its first with `truncation_side`
    "right"; all of a shorter prompt)."""
    if keep is None or len(ids) <= keep:
        return ids
    return ids[:keep] if side == "right" else ids[-keep:]


def prompt_logprobs_field(tokenizer: Any, prompt_ids: list[int],
                          lps: list[Logprob | None]) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}}
    for the top alternatives and the prompt's own token."""

    def decoded(tid: int) -> str:
        return f"token_id:{tid}" if tokenizer is None else tokenizer.decode([tid])

    out: list[dict[str, dict[str, Any]] | None] = []
    for tid, lp in zip(prompt_ids, lps):
        if lp is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": v, "rank": i + 1, "decoded_token": decoded(t)} for i, (t, v) in enumerate(lp.top)}
        entry.setdefault(str(tid), {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": decoded(tid)})
        out.append(entry)
    return out
