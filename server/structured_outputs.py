"""Structured-output request fields -> a compiled `GrammarSpec` for the engine.

Accepted, on /v1/completions and /v1/chat/completions (at most one of them per request):
- `response_format`: `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name", "schema", ...}}`
  (`{"type": "text"}` is no constraint);
- vLLM's `structured_outputs`: `{"json": schema}`, `{"regex": str}`, `{"choice": [str, ...]}`, `{"grammar": ebnf}`
  (also `{"json_object": true}`);
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

A malformed field or an invalid schema / regex / grammar is a 400 naming the field. Compiling runs in a worker
thread (never on the event loop, never in the engine's loop) through an LRU keyed by the spec; the engine receives
the serialized compiled grammar and only deserializes it.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from engine.errors import InvalidParam
from engine.structured import GrammarSpec

LEGACY = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# every request field this module implements (the field registry must not call them unimplemented)
FIELDS = ("response_format", "structured_outputs", *LEGACY)


def _schema_text(value: Any, name: str) -> str:
    """A JSON schema given as an object or as JSON text -> canonical JSON text (the cache key)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidParam(name, f"{name} must be a JSON schema (an object or its JSON text)") from None
    if not isinstance(value, (dict, bool)):
        raise InvalidParam(name, f"{name} must be a JSON schema object, got {type(value).__name__}")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # key order kept: it orders the output


def _spec(kind: str, value: Any, name: str) -> GrammarSpec:
    if kind == "json":
        return GrammarSpec("json", _schema_text(value, name), name)
    if kind == "json_object":
        return GrammarSpec("json_object", "", name)
    if kind in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            raise InvalidParam(name, f"{name} must be a non-empty string")
        return GrammarSpec(kind, value, name)
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise InvalidParam(name, f"{name} must be a non-empty list of non-empty strings")
    return GrammarSpec("choice", json.dumps(value, ensure_ascii=False), name)


def _from_response_format(rf: Any) -> GrammarSpec | None:
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise InvalidParam("response_format", "response_format must be an object")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "", "response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise InvalidParam("response_format", "response_format json_schema needs json_schema.schema")
        return GrammarSpec("json", _schema_text(js["schema"], "response_format"), "response_format")
    raise InvalidParam("response_format",
                       f"response_format type must be one of text, json_object, json_schema, got {kind!r}")


def _from_structured_outputs(so: Any) -> GrammarSpec | None:
    if so is None:
        return None
    if not isinstance(so, dict):
        raise InvalidParam("structured_outputs", "structured_outputs must be an object")
    unknown = sorted(k for k in so if k not in STRUCTURED_KEYS and so[k] is not None)
    if unknown:
        raise InvalidParam("structured_outputs",
                           f"structured_outputs.{unknown[0]} is not supported (use one of "
                           f"{', '.join(STRUCTURED_KEYS)})")
    given = [k for k in STRUCTURED_KEYS if so.get(k) not in (None, False)]
    if len(given) > 1:
        raise InvalidParam("structured_outputs", f"structured_outputs takes one constraint, got {', '.join(given)}")
    if not given:
        return None
    return _spec(given[0], so[given[0]], "structured_outputs")


def spec_of(req: Any) -> GrammarSpec | None:
    """The constraint a request asks for (None: none); InvalidParam naming the field when it is malformed or
    when the request sets more than one."""
    found: list[GrammarSpec] = []
    rf = _from_response_format(getattr(req, "response_format", None))
    if rf is not None:
        found.append(rf)
    so = _from_structured_outputs(getattr(req, "structured_outputs", None))
    if so is not None:
        found.append(so)
    for name, kind in LEGACY.items():
        value = getattr(req, name, None)
        if value is not None:
            found.append(_spec(kind, value, name))
    if len(found) > 1:
        raise InvalidParam(found[1].field, f"only one structured output constraint per request: {found[0].field} "
                                           f"and {found[1].field} are both set")
    return found[0] if found else None


class StructuredOutputs:
    """The server's compile cache: a spec -> the same spec carrying its serialized compiled grammar."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_entries: int = 256) -> None:
        from engine.grammar import GrammarCompilerCache

        self.compiler = GrammarCompilerCache(tokenizer, vocab_size, max_entries=max_entries)
        self._serialized: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.max_entries = max_entries

    async def compiled(self, spec: GrammarSpec) -> GrammarSpec:
        """`spec` with its compiled grammar; InvalidParam naming the field when it does not compile. The LRU of
        serialized grammars is touched only here, on the event loop; the worker thread only compiles."""
        text = self._serialized.get(spec.key)
        if text is None:
            text = await asyncio.to_thread(self.compiler.serialized, spec)
            self._serialized[spec.key] = text
            while len(self._serialized) > self.max_entries:
                self._serialized.popitem(last=False)
        else:
            self._serialized.move_to_end(spec.key)
        return replace(spec, compiled=text)
