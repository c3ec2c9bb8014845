"""What a structured-output request asks for, as plain data (`GrammarSpec`): it rides in SamplingParams from the
server to the engine, across the process boundary (pickled), so it is torch- and xgrammar-free.

The server compiles the spec (in a worker thread, cached; `server.structured_outputs`) and ships xgrammar's
serialized compiled grammar with it, so the engine only deserializes it (about a millisecond, cached by the spec)
instead of compiling on its critical path. `engine.grammar` turns it into a logits processor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class GrammarSpec:
    """One constraint: `kind` is one of KINDS; `source` its canonical text (a JSON schema as JSON, a regex, the
    choices as a JSON list, EBNF; empty for json_object); `field` the request field it came from (errors name it).
    `compiled` is xgrammar's `CompiledGrammar.serialize_json()` of it, for the engine (None: the engine compiles)."""

    kind: str
    source: str
    field: str = "structured_outputs"
    compiled: str | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def key(self) -> tuple[str, str]:
        """The cache key: what the grammar is, not where it came from."""
        return self.kind, self.source
