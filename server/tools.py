"""Tool calling on /v1/chat/completions: checking `tools` / `tool_choice` / `parallel_tool_calls`, the messages the
chat template sees, and turning a choice's output into OpenAI's `tool_calls`, whole or as stream deltas.

- `tool_choice` `none`: tools are rendered, nothing is parsed; `auto` (the default with tools): the configured
  parser (`[server] tool_call_parser`) finds calls in the output;
- a named function: the output is constrained (a grammar, like `structured_outputs`) to that function's
  parameters schema, and is that call's arguments;
- `required`: the output is constrained to a JSON array of `{"name", "parameters"}` objects, one per call (at
  most one when `parallel_tool_calls` is false), each `parameters` valid for its function.

A choice whose output holds calls finishes with `tool_calls` (when the engine finished it with `stop`).
Streaming sends calls as OpenAI does: per call a first delta with `index`, `id`, `type` and `function.name` (and
`arguments: ""`), then `function.arguments` fragments.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidParam
from engine.structured import GrammarSpec
from server.tool_parsers import ParsedCall, ToolParser, get_parser

FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


def _function(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidParam("tools", f"tools[{i}] must be an object of type 'function'")
    fn = tool.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidParam("tools", f"tools[{i}].function must be an object with a non-empty string name")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidParam("tools", f"tools[{i}].function.parameters must be a JSON schema object")
    return fn


@dataclass
class ToolPlan:
    """How a chat request uses its tools: `choice` none | auto | required | named, `name` for named, the grammar
    that enforces required / named, and the functions by name."""

    choice: str
    functions: dict[str, dict[str, Any]]
    name: str | None = None
    grammar: GrammarSpec | None = None
    parallel: bool = True


def plan(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan | None:
    """The request's ToolPlan (None without tools); InvalidParam naming the field for anything malformed."""
    if tools is not None and len(tools) == 0:  # OpenAI and vLLM refuse it too, rather than read it as no tools
        raise InvalidParam("tools", "tools is an empty list: send at least one tool, or leave tools out")
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise InvalidParam("tool_choice", "When using `tool_choice`, `tools` must be set.")
        return None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = _function(tool, i)
        functions[fn["name"]] = fn
    parallel = parallel_tool_calls is not False
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidParam("tool_choice", "a named tool_choice is {\"type\": \"function\", \"function\": "
                                              "{\"name\": ...}}")
        if name not in functions:
            raise InvalidParam("tool_choice", f"tool_choice names function {name[:100]!r}, which is not in tools")
        schema = functions[name].get("parameters") or {"type": "object"}
        spec = GrammarSpec("json", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), "tool_choice")
        return ToolPlan("named", functions, name, spec, parallel)
    if choice not in ("none", "auto", "required"):
        raise InvalidParam("tool_choice", f"tool_choice must be none, auto, required or a named function, got "
                                          f"{str(choice)[:100]!r}")
    if choice != "required":
        return ToolPlan(choice, functions, parallel=parallel)
    return ToolPlan("required", functions, grammar=GrammarSpec("json", json.dumps(
        _required_schema(functions, parallel), separators=(",", ":"), ensure_ascii=False), "tool_choice"),
        parallel=parallel)


def _required_schema(functions: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """A JSON array of calls, each `{"name": <one function>, "parameters": <its schema>}`."""
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                               "parameters": fn.get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False}
             for name, fn in functions.items()]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The request's messages as the chat template expects them: text content, assistant `tool_calls` with their
    arguments as objects (what Hermes / Qwen templates print with tojson), `tool_call_id` of tool results."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "\n".join(
            p.text for p in m.content)
        msg: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        calls = getattr(m, "tool_calls", None)
        if calls:
            msg["tool_calls"] = [_template_call(c) for c in calls]
        call_id = getattr(m, "tool_call_id", None)
        if call_id is not None:
            msg["tool_call_id"] = call_id
        out.append(msg)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except ValueError:
            pass  # the template prints the text as it is
    return {**call, "function": fn}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolOutput:
    """One choice's tool calls: parsed from the whole text (`final`) or assembled from its deltas (`delta`)."""

    plan: ToolPlan
    parser: ToolParser | None
    calls_sent: int = 0
    named_id: str | None = None
    _held: list[str] = field(default_factory=list)

    @classmethod
    def for_plan(cls, tool_plan: ToolPlan, parser_name: str) -> ToolOutput | None:
        if tool_plan.choice == "none":
            return None
        return cls(tool_plan, get_parser(parser_name) if tool_plan.choice == "auto" else None)

    # ---- whole ----
    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content, calls) of a whole output; an output that does not parse stays content."""
        if self.plan.choice == "named":
            assert self.plan.name is not None
            return None, [ParsedCall(self.plan.name, text)]
        if self.plan.choice == "required":
            return _required_calls(text)
        assert self.parser is not None
        return self.parser.parse(text)

    def final(self, text: str, finish_reason: str | None = None) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool_calls) of a whole output in OpenAI's shape, [] when it made no call. A forced choice
        (required, named) that ran out of tokens before its JSON closed made no call, only a cut one: empty content
        and tool_calls None, as OpenAI and vLLM answer."""
        if finish_reason == "length" and self.plan.choice in ("required", "named") and not _whole_json(text):
            return "", None
        content, calls = self.parse(text)
        return content, [_openai_call(c, _call_id()) for c in calls]

    # ---- streaming ----
    def delta(self, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """A stream's next text -> (content to send, tool-call deltas to send)."""
        if self.plan.choice == "named":
            out = []
            if self.named_id is None:
                self.named_id = _call_id()
                out.append(_header(0, self.named_id, self.plan.name or ""))
            if text:
                out.append({"index": 0, "function": {"arguments": text}})
            return "", out
        if self.plan.choice == "required":  # a JSON array parses only whole: its calls leave at the end
            self._held.append(text)
            if not final:
                return "", []
            content, calls = _required_calls("".join(self._held))
            return content or "", self._send(calls)
        assert self.parser is not None
        ev = self.parser.feed(text)
        content, calls = ev.content, list(ev.calls or [])
        if final:
            end = self.parser.flush()
            content += end.content
            calls += end.calls or []
        return content, self._send(calls)

    @property
    def called(self) -> bool:
        return self.calls_sent > 0 or self.named_id is not None

    def _send(self, calls: list[ParsedCall]) -> list[dict[str, Any]]:
        out = []
        for c in calls:
            out.append(_header(self.calls_sent, _call_id(), c.name))
            out.append({"index": self.calls_sent, "function": {"arguments": c.arguments}})
            self.calls_sent += 1
        return out


def _header(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}


def _openai_call(call: ParsedCall, call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _whole_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _required_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    try:
        items = json.loads(text)
    except ValueError:
        return text or None, []
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                              for i in items):
        return text or None, []
    return None, [ParsedCall(i["name"], json.dumps(i.get("parameters", {}), ensure_ascii=False)) for i in items]


def tool_finish_reason(tools: ToolOutput | None, called: bool, reason: str | None) -> str | None:
    """`tool_calls` for a choice the engine stopped after it made calls."""
    return "tool_calls" if tools is not None and called and reason == "stop" else reason
