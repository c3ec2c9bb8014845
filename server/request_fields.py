"""Every request field of vLLM's OpenAI protocol, and what trimode does with it: nothing is silently ignored.

`FIELDS` lists, per endpoint, the fields of vLLM's `CompletionRequest` and `ChatCompletionRequest`
(vllm/entrypoints/openai/protocol.py, plus `structured_outputs` and `return_token_ids` of later releases) and
trimode's own knobs, each implemented or not. `check_fields` runs before anything else on a request:
- an unimplemented field set to anything but its "off" value (null, or vLLM's default) is a 400 naming it;
- a field outside the protocol is ignored with one warning line per request, as vLLM does.

The structured-output and tool fields are the other helpers' modules' (`server.structured_outputs.FIELDS`,
`server.tools.FIELDS`): listed here as implemented. README's API table is this registry in prose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidParam

log = logging.getLogger("trimode.server")

COMPLETIONS, CHAT = "completions", "chat"


@dataclass(frozen=True)
class FieldStatus:
    implemented: bool
    off: Any = None  # unimplemented fields: the value (besides null) that asks for nothing
    note: str = ""


def _yes(note: str = "") -> FieldStatus:
    return FieldStatus(True, note=note)


def _no(off: Any = None, note: str = "") -> FieldStatus:
    return FieldStatus(False, off, note)


_COMMON: dict[str, FieldStatus] = {
    # OpenAI's own
    "model": _yes("omitted or empty: the served model"),
    "frequency_penalty": _yes(), "presence_penalty": _yes(), "logit_bias": _yes(), "n": _yes(), "seed": _yes(),
    "stop": _yes(), "stream": _yes(), "stream_options": _yes(), "temperature": _yes(), "top_p": _yes(),
    "user": _yes("an opaque tag, logged nowhere"), "logprobs": _yes(),
    # vLLM sampling params
    "top_k": _yes(), "min_p": _yes(), "repetition_penalty": _yes(), "stop_token_ids": _yes(),
    "include_stop_str_in_output": _yes(), "ignore_eos": _yes(), "min_tokens": _yes(), "skip_special_tokens": _yes(),
    "spaces_between_special_tokens": _yes(), "truncate_prompt_tokens": _yes(), "truncation_side": _yes(),
    "allowed_token_ids": _yes(),
    "prompt_logprobs": _yes("not with stream"), "bad_words": _yes(), "echo": _yes(),
    "use_beam_search": _no(False, "beam search is not implemented"), "length_penalty": _no(1.0, "beam search only"),
    # vLLM extra params
    "add_special_tokens": _yes(), "return_tokens_as_token_ids": _yes(), "return_token_ids": _yes(),
    "response_format": _yes(), "structured_outputs": _yes(), "guided_json": _yes(), "guided_regex": _yes(),
    "guided_choice": _yes(), "guided_grammar": _yes(),
    "guided_decoding_backend": _no(note="one backend (xgrammar)"),
    "guided_whitespace_pattern": _no(note="not implemented"),
    "priority": _no(0, "no priority scheduling"), "request_id": _no(note="trimode makes its own ids"),
    "logits_processors": _no(note="no user logits processors"),
    "cache_salt": _yes("only requests with the same salt share prefix-cached KV"),
    "kv_transfer_params": _no(note="no disaggregated serving"), "vllm_xargs": _no(note="no custom extensions"),
    # trimode's knobs
    "mode": _yes("trimode"), "steps": _yes("trimode"), "block_length": _yes("trimode"),
    "threshold": _yes("trimode"), "timeout": _yes("trimode: per-request deadline"),
}

FIELDS: dict[str, dict[str, FieldStatus]] = {
    COMPLETIONS: {**_COMMON, "prompt": _yes(), "max_tokens": _yes(), "best_of": _yes("only equal to n"),
                  "suffix": _no(note="not supported by the model"), "prompt_embeds": _no(note="token ids only")},
    CHAT: {**_COMMON, "messages": _yes(), "max_tokens": _yes(), "max_completion_tokens": _yes(),
           "top_logprobs": _yes(), "tools": _yes(), "tool_choice": _yes(), "parallel_tool_calls": _yes(),
           "best_of": _no(1, "chat has one candidate per choice"),
           "add_generation_prompt": _yes(), "continue_final_message": _yes(), "chat_template_kwargs": _yes(),
           "reasoning_effort": _no(note="no reasoning parser"), "include_reasoning": _no(True, "no reasoning parser"),
           "documents": _no(note="not implemented"), "chat_template": _no(note="the model's template only"),
           "mm_processor_kwargs": _no(note="text only"), "media_io_kwargs": _no(note="text only"),
           "structural_tag": _no(note="not implemented")},
}


def _is_off(value: Any, status: FieldStatus) -> bool:
    if value is None or (isinstance(value, (list, dict, str)) and not value):
        return True
    if status.off is None or isinstance(value, bool) != isinstance(status.off, bool):
        return False
    return isinstance(value, (int, float)) and value == status.off


def check_fields(body_fields: dict[str, Any], endpoint: str) -> list[str]:
    """Refuse (InvalidParam naming it) an unimplemented field asking for something; return the fields outside the
    protocol, logged once as ignored."""
    known = FIELDS[endpoint]
    unknown = []
    for name, value in body_fields.items():
        status = known.get(name)
        if status is None:
            unknown.append(name)
        elif not status.implemented and not _is_off(value, status):
            raise InvalidParam(name, f"{name} is not supported by this server ({status.note})")
    if unknown:
        log.warning("The following fields were present in the request but ignored: %s", sorted(unknown))
    return unknown


def body_fields(req: Any) -> dict[str, Any]:
    """The fields a pydantic request model was sent: declared ones set in the body, and extras."""
    out = {name: getattr(req, name) for name in req.model_fields_set}
    out.update(req.model_extra or {})
    return out


def readme_table() -> str:
    """The README's field table (markdown), generated from the registry."""
    rows = ["| field | /v1/completions | /v1/chat/completions | notes |", "|---|---|---|---|"]
    names = list(dict.fromkeys([*FIELDS[COMPLETIONS], *FIELDS[CHAT]]))

    def cell(endpoint: str, name: str) -> str:
        s = FIELDS[endpoint].get(name)
        return "—" if s is None else "yes" if s.implemented else "400 if set"

    for name in names:
        notes = {s.note for e in (COMPLETIONS, CHAT) if (s := FIELDS[e].get(name)) is not None and s.note}
        rows.append(f"| `{name}` | {cell(COMPLETIONS, name)} | {cell(CHAT, name)} | {'; '.join(sorted(notes))} |")
    return "\n".join(rows)
