"""Incremental, UTF-8-safe detokenizing and stop-string matching for one choice of one request.

`IncrementalDetokenizer` turns token ids into text deltas without ever emitting a partial character: it decodes
a small window (`prefix_offset:`) and holds back while the text ends in U+FFFD (an incomplete byte sequence).
`StopChecker` finds stop strings across chunk boundaries and holds back the last `len(longest stop) - 1`
characters, so text that later turns out to start a stop string is never streamed: output is never retracted.
"""

from __future__ import annotations

from typing import Protocol

# NOTE: a few prompt tokens give the decoder left context (leading-space handling in SentencePiece decoders).
PROMPT_CONTEXT = 5


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """`skip_special_tokens` (vLLM's default True) drops special tokens from the text; when they are kept,
    `spaces_between_special_tokens` (default True) sets each apart from its neighbours with a space, as
    transformers' slow tokenizers define it (runs of ordinary tokens are decoded together)."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces = spaces_between_special_tokens
        self._special: set[int] = set() if skip_special_tokens else set(getattr(tokenizer, "all_special_ids", ()))
        # special tokens set apart: no prompt context (the output must not start with the space that would part it
        # from the prompt's last token)
        self.ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:]) if not self._special else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        if self.skip_special_tokens or not self._special:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        parts: list[str] = []
        run: list[int] = []
        for t in ids:
            if t in self._special:
                if run:
                    parts.append(self.tokenizer.decode(run, skip_special_tokens=False))
                    run = []
                parts.append(self.tokenizer.decode([t], skip_special_tokens=False))
            else:
                run.append(t)
        if run:
            parts.append(self.tokenizer.decode(run, skip_special_tokens=False))
        return (" " if self.spaces else "").join(p for p in parts if p)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of the request: whatever is still held back, with U+FFFD for incomplete bytes."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


class StopChecker:
    """Accumulates one choice's text; `push` returns the text safe to emit and whether a stop string hit."""

    def __init__(self, stop: list[str], include_stop: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # everything accepted so far (final output after a stop)
        self.emitted = 0  # characters of `text` already handed out
        self.stop_reason: str | None = None

    def push(self, delta: str, final: bool = False, match: bool = True) -> tuple[str, bool]:
        """Add decoded text; return (text to emit now, stopped). After a stop, further pushes emit nothing.
        `match=False` (text of the first min_tokens tokens): no stop string is looked for in this push, though one
        that starts in it and ends in a later push is found there."""
        if self.stop_reason is not None:
            return "", True
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        hit: tuple[int, str] | None = None
        for s in self.stop if match else ():
            pos = self.text.find(s, start)
            if pos >= 0 and (hit is None or pos < hit[0]):
                hit = (pos, s)
        if hit is not None:
            pos, s = hit
            self.text = self.text[:pos + len(s)] if self.include_stop else self.text[:pos]
            self.stop_reason = s
            final = True
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out, self.stop_reason is not None
