"""The tool-parser interface: a parser splits the text a model wrote into plain content and tool calls, either
from the whole text (`parse`) or incrementally from text deltas (`feed` / `flush`), for streaming."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedCall:
    """One call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


@dataclass
class StreamEvent:
    """What one delta of text yields: content to send now, and calls completed by it (in order)."""

    content: str = ""
    calls: list[ParsedCall] | None = None


class ToolParser(ABC):
    @abstractmethod
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """The whole output -> (content, or None when there is none, calls)."""

    @abstractmethod
    def feed(self, delta: str) -> StreamEvent:
        """The next text delta of a stream -> content safe to send now and calls completed by it."""

    @abstractmethod
    def flush(self) -> StreamEvent:
        """The stream ended: whatever is held back."""
