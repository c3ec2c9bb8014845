"""Tool-call parsers: model output text -> (content, tool calls), whole or as a stream. `[server] tool_call_parser`
names one of PARSERS; a new format is one module with a `ToolParser` subclass registered here."""

from __future__ import annotations

from server.tool_parsers.base import ParsedCall, ToolParser
from server.tool_parsers.hermes import HermesToolParser

PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser}


def get_parser(name: str) -> ToolParser:
    """A fresh parser (parsers keep per-stream state) for the configured name; ValueError for an unknown one."""
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool_call_parser {name!r}; known: {', '.join(sorted(PARSERS))}") from None


__all__ = ["PARSERS", "ParsedCall", "ToolParser", "get_parser"]
