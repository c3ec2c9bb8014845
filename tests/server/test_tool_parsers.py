"""The Hermes tool-call parser: whole text and any split into stream deltas give the same content and calls."""

from __future__ import annotations

import json

import pytest

from server.tool_parsers import get_parser
from server.tool_parsers.base import ParsedCall

CALL_A = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_B = '<tool_call>{"name": "clock", "arguments": {}}</tool_call>'

CASES = [
    ("plain text, no call", "plain text, no call", []),
    ("Let me look. " + CALL_A, "Let me look.", [ParsedCall("weather", '{"city": "Paris"}')]),
    (CALL_A + "\n" + CALL_B, None, [ParsedCall("weather", '{"city": "Paris"}'), ParsedCall("clock", "{}")]),
    ('<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}', None,
     [ParsedCall("weather", '{"city": "Rome"}')]),  # ended before its closing tag, complete
    ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
    ("a < b <tool but no call", "a < b <tool but no call", []),
]


def _streamed(text: str, size: int) -> tuple[str, list[ParsedCall]]:
    parser = get_parser("hermes")
    content, calls = "", []
    for i in range(0, len(text), size):
        ev = parser.feed(text[i:i + size])
        content += ev.content
        calls += ev.calls or []
    ev = parser.flush()
    return content + ev.content, calls + (ev.calls or [])


@pytest.mark.parametrize("text,content,calls", CASES)
def test_whole_and_streamed_agree(text: str, content: str | None, calls: list[ParsedCall]) -> None:
    assert get_parser("hermes").parse(text) == (content, calls)
    for size in (1, 2, 3, 7, len(text)):
        streamed_content, streamed_calls = _streamed(text, size)
        assert streamed_calls == calls
        assert streamed_content.strip() == (content or "")
    for c in calls:
        json.loads(c.arguments)


def test_unknown_parser_is_an_error() -> None:
    with pytest.raises(ValueError, match="tool_call_parser"):
        get_parser("nope")


def test_config_refuses_an_unknown_parser() -> None:
    from server.config import ServerConfig

    assert ServerConfig(tool_call_parser="hermes").tool_call_parser == "hermes"
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerConfig(tool_call_parser="nope")
