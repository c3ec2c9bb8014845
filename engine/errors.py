"""The engine's typed request error. Torch-free: the server maps it to an HTTP 400 without parsing text."""

from __future__ import annotations


class InvalidParam(ValueError):
    """A request the engine cannot run, and the request field to blame.

    `field` is the engine's name for it (`max_tokens`, `block_length`, `prompt`, `input_tokens` for a context
    overflow...); the server translates it to the name the client sent (e.g. `prompt` -> `messages` for chat).
    A `ValueError`, so callers that only need the message keep working."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple:  # picklable across the engine process boundary with its field
        return (type(self), (self.field, str(self)))
