"""One streaming request: build the OpenAI payload, read the SSE stream, time every content chunk."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtest.config import BenchmarkConfig


@dataclass
class RequestInput:
    """One prompt to send."""

    index: int
    prompt: str
    output_len: int
    prompt_len: int | None = None  # token count when known (from /tokenize); else taken from usage
    mode: str | None = None  # requested mode; None = server default
    messages: list[dict[str, str]] | None = None  # chat: the whole conversation (multi-turn); None = [user: prompt]


@dataclass
class RequestOutput:
    """What the client measured for one request. Times are seconds (perf_counter based)."""

    index: int
    requested_mode: str | None = None
    mode: str | None = None  # the mode the server reports having run (top-level "mode" of the chunks)
    success: bool = False
    error: str = ""
    start_time: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    chunk_times: list[float] = field(default_factory=list)  # absolute arrival time of each content chunk
    output_tokens: int = 0
    prompt_tokens: int = 0
    usage_reported: bool = False
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server reports it
    generated_text: str = ""

    @property
    def num_chunks(self) -> int:
        """Number of content-carrying chunks."""
        return len(self.chunk_times)

    @property
    def served_mode(self) -> str:
        """The mode to attribute this request to: server-reported, else requested, else 'default'."""
        return self.mode or self.requested_mode or "default"


def endpoint_path(endpoint: str) -> str:
    """The OpenAI path for ``completions`` or ``chat``."""
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def build_payload(cfg: BenchmarkConfig, req: RequestInput, model: str) -> dict[str, Any]:
    """The JSON body: OpenAI fields plus trimode's top-level mode knobs."""
    payload: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": cfg.temperature,
    }
    if cfg.endpoint == "chat":
        payload["messages"] = req.messages or [{"role": "user", "content": req.prompt}]
        payload["max_completion_tokens"] = req.output_len
    else:
        payload["prompt"] = req.prompt
        payload["max_tokens"] = req.output_len
    if req.mode is not None:
        payload["mode"] = req.mode
    for key in ("steps", "block_length", "threshold"):
        value = getattr(cfg, key)
        if value is not None:
            payload[key] = value
    if cfg.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(cfg.extra_body)
    return payload


async def iter_sse_data(lines: AsyncIterator[str]) -> AsyncIterator[tuple[float, str]]:
    """Yield ``(arrival_time, data)`` per SSE event; multi-line data fields are joined with newlines."""
    data_lines: list[str] = []
    first_at = 0.0
    async for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data_lines:
                yield first_at, "\n".join(data_lines)
                data_lines = []
            continue
        if line.startswith(":"):
            continue  # SSE comment / keep-alive
        name, _, value = line.partition(":")
        if name != "data":
            continue
        if not data_lines:
            first_at = time.perf_counter()
        data_lines.append(value[1:] if value.startswith(" ") else value)
    if data_lines:
        yield first_at, "\n".join(data_lines)


def error_message(obj: Any) -> str | None:
    """The message of an error event / body (vLLM ``{"error": {...}}`` or SGLang's flat shape), else None."""
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if err is not None:
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    if obj.get("object") == "error":
        return str(obj.get("message") or obj)
    return None


def chunk_text(obj: dict[str, Any]) -> str:
    """Concatenated new text of all choices in one chunk (completions ``text`` or chat ``delta``)."""
    parts: list[str] = []
    for choice in obj.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        if "delta" in choice:
            delta = choice.get("delta") or {}
            for key in ("content", "reasoning_content", "reasoning"):
                value = delta.get(key)
                if value:
                    parts.append(str(value))
        elif choice.get("text"):
            parts.append(str(choice["text"]))
    return "".join(parts)


async def send_request(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], headers: dict[str, str], req: RequestInput
) -> RequestOutput:
    """POST one streaming request and measure it. Never raises: failures come back with success=False."""
    out = RequestOutput(index=req.index, requested_mode=req.mode)
    out.start_time = time.perf_counter()
    text: list[str] = []
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                try:
                    msg = error_message(json.loads(body)) or body
                except ValueError:
                    msg = body
                out.error = f"HTTP {resp.status_code}: {msg}"[:500]
                out.latency = time.perf_counter() - out.start_time
                return out
            last_at = 0.0
            async for at, data in iter_sse_data(resp.aiter_lines()):
                if data.strip() == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except ValueError:
                    out.error = f"bad SSE data: {data[:200]}"
                    break
                msg = error_message(obj)
                if msg is not None:
                    out.error = msg[:500]
                    break
                if not isinstance(obj, dict):
                    continue
                if out.mode is None and obj.get("mode"):
                    out.mode = str(obj["mode"])
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    out.usage_reported = True
                    out.output_tokens = int(usage.get("completion_tokens") or 0)
                    out.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    details = usage.get("prompt_tokens_details")
                    if isinstance(details, dict) and details.get("cached_tokens") is not None:
                        out.cached_tokens = int(details["cached_tokens"])
                piece = chunk_text(obj)
                if not piece:
                    continue
                if not out.chunk_times:
                    out.ttft = at - out.start_time
                else:
                    out.itl.append(at - last_at)
                last_at = at
                out.chunk_times.append(at)
                text.append(piece)
        out.latency = time.perf_counter() - out.start_time
    except Exception as exc:  # network errors, protocol errors, timeouts: all count as failures
        out.latency = time.perf_counter() - out.start_time
        out.error = f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__
        return out
    out.generated_text = "".join(text)
    if out.error:
        return out
    if not out.usage_reported:
        out.output_tokens = out.num_chunks  # fallback: one token per chunk
    if not out.chunk_times:
        out.ttft = out.latency  # nothing streamed (e.g. immediate EOS): first byte == last byte
    if out.prompt_tokens == 0 and req.prompt_len is not None:
        out.prompt_tokens = req.prompt_len
    out.success = True
    return out
