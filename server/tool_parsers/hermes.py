"""Hermes-style tool calls (Qwen2.5, Hermes 2/3, trimode's built-in template): each call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` in the output; text outside the tags is content.

A block that is not valid JSON with a string `name` stays content (as vLLM's hermes parser: the model's text is
never dropped). A stream holds back only text that may still turn out to be a tag, and a call leaves as a whole
once its closing tag arrives (or the stream ends with it unclosed but complete).
"""

from __future__ import annotations

import json

from server.tool_parsers.base import ParsedCall, StreamEvent, ToolParser

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _call(body: str) -> ParsedCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ParsedCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class HermesToolParser(ToolParser):
    def __init__(self) -> None:
        self._buf = ""  # text not yet sent: a possible tag start, or an open call's body
        self._in_call = False

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        content: list[str] = []
        calls: list[ParsedCall] = []
        rest = text
        while True:
            start = rest.find(OPEN)
            if start < 0:
                content.append(rest)
                break
            end = rest.find(CLOSE, start + len(OPEN))
            body = rest[start + len(OPEN): end if end >= 0 else len(rest)]
            call = _call(body.strip())
            if call is None:
                content.append(rest)
                break
            content.append(rest[:start])
            calls.append(call)
            if end < 0:
                break
            rest = rest[end + len(CLOSE):]
        text_out = "".join(content)
        if not calls:
            return text_out, calls
        return text_out.strip() or None, calls  # around calls, only real text is content

    def feed(self, delta: str) -> StreamEvent:
        self._buf += delta
        out = StreamEvent()
        while True:
            if not self._in_call:
                start = self._buf.find(OPEN)
                if start < 0:
                    keep = _partial_tag_len(self._buf, OPEN)
                    out.content += self._buf[:len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                out.content += self._buf[:start]
                self._buf = self._buf[start + len(OPEN):]
                self._in_call = True
            end = self._buf.find(CLOSE)
            if end < 0:
                return out
            body, self._buf = self._buf[:end], self._buf[end + len(CLOSE):]
            self._in_call = False
            call = _call(body.strip())
            if call is None:  # not a call after all: its text is content
                out.content += OPEN + body + CLOSE
            else:
                out.calls = (out.calls or []) + [call]

    def flush(self) -> StreamEvent:
        out = StreamEvent()
        if self._in_call:
            call = _call(self._buf.strip())
            if call is None:
                out.content = OPEN + self._buf
            else:
                out.calls = [call]
        else:
            out.content = self._buf
        self._buf, self._in_call = "", False
        return out
