"""Pydantic request models of the OpenAI API plus trimode's top-level decoding knobs, and the error body.

Unknown fields are accepted and ignored (as vLLM does); fields we cannot honour yet are declared so that the
serving layer can answer 400 naming them. Validation failures become 400 (never FastAPI's 422) in
`app.py`. The decoding knobs `mode`, `steps`, `block_length`, `threshold` sit at the top level, where
OpenAI clients put `extra_body`.

Hostile bodies stay cheap: every list fails fast (pydantic stops at its first bad item instead of building one
error per item, which for a 3 MB body was 1.6 million errors and over 10 s of event loop), and no dict types its
values, so a body yields a few errors however large it is. A request body whose text cannot be encoded as UTF-8
(a lone surrogate, from an unpaired `\ud800` escape) is refused naming its top-level field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, FailFast, Field, model_validator
from pydantic_core import PydanticCustomError

INT64 = 2**63 - 1

ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    500: "InternalServerError", 501: "NotImplementedError", 503: "ServiceUnavailableError",
}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI/vLLM error shape; `code` is the HTTP status as an integer, messages are bounded and always encodable."""
    if len(message) > 1000:
        message = message[:1000] + "..."
    return {"error": {"message": _encodable(message), "type": ERROR_TYPES.get(status, "Error"),
                      "param": None if param is None else _encodable(param), "code": status}}


def _encodable(text: str) -> str:
    # an error may echo client text; a lone surrogate in it would make rendering the error itself fail (a 500)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _FailFast(FailFast):
    """pydantic's FailFast, hashable so that `typing.Union` can deduplicate annotated list types."""

    __hash__ = object.__hash__


FAIL_FAST = _FailFast()


def first_unencodable(data: dict[str, Any]) -> str | None:
    """The first top-level key of `data` whose key or value holds text UTF-8 cannot encode (a lone surrogate).

    json.dumps and str.encode walk the value in C: tens of milliseconds for a 3 MB body. Values that are not JSON
    (models built in Python) are skipped: only request bodies need the check.
    """
    for key, value in data.items():
        try:
            json.dumps([key, value], ensure_ascii=False, skipkeys=True, default=lambda _: None).encode("utf-8")
        except UnicodeEncodeError:
            return str(key)
    return None


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestBody(OpenAIModel):
    """A whole request body: refuses, naming the field, any text that cannot be encoded as UTF-8."""

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            try:
                bad = first_unencodable(data)
            except RecursionError:
                raise PydanticCustomError("json_invalid", "the body is nested too deeply") from None
            if bad is not None:
                # the handler in app.py takes `param` from ctx: a model-level error has no field in its loc.
                # pydantic itself cannot hold a lone surrogate in ctx, so a bad key is named by its escape
                raise PydanticCustomError(
                    "string_unicode", "text must be valid Unicode: it holds a lone surrogate (an unpaired "
                    "\\ud800-\\udfff escape or invalid UTF-8 bytes)", {"param": _encodable(bad)})
        return data


Ints = Annotated[list[int], FAIL_FAST]
Strs = Annotated[list[str], FAIL_FAST]
IntLists = Annotated[list[Ints], FAIL_FAST]


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class SamplingFields(RequestBody):
    """Fields shared by both endpoints."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's range; below SAMPLING_EPS means greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1)
    stop: str | Strs | None = None
    stop_token_ids: Ints | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = Field(None, ge=-INT64 - 1, le=INT64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None  # token id (text) -> bias; values checked when mapped (typed values
    # would cost one error each)
    # vLLM's sampling params and extensions (server.request_fields lists every field's status)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    allowed_token_ids: Ints | None = None
    bad_words: Strs | None = None
    prompt_logprobs: int | None = Field(None, ge=0)
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    truncation_side: Literal["left", "right"] | None = None  # which end truncate_prompt_tokens cuts (default left)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    timeout: float | None = Field(None, gt=0, description="trimode: per-request deadline in seconds")
    cache_salt: str | None = Field(None, min_length=1, description="vLLM: only requests with the same salt share "
                                   "prefix-cached KV blocks")
    mode: str | None = Field(None, description="trimode: ar | diffusion | self_spec | auto (default from the config)")
    steps: int | None = Field(None, ge=1, description="trimode: diffusion refinement steps per block")
    block_length: int | None = Field(None, ge=2, description="trimode: diffusion / self_spec block length")
    threshold: float | None = Field(None, gt=0, le=1, description="trimode: diffusion commit confidence")


class CompletionRequest(SamplingFields):
    prompt: str | Strs | Ints | IntLists
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    add_special_tokens: bool = True


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], FAIL_FAST] | None = None
    name: str | None = None
    tool_calls: Annotated[list[dict[str, Any]], FAIL_FAST] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], FAIL_FAST] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)
    tools: Annotated[list[dict[str, Any]], FAIL_FAST] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    echo: bool = False  # prepend the last message's content when it is the assistant's (vLLM)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], FAIL_FAST] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: Ints
