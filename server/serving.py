"""Request -> (prompt ids, SamplingParams) -> AsyncEngine -> OpenAI JSON or SSE; errors -> OpenAI error bodies.

Every check that can fail (model name, unsupported fields, limits, tokenization, the engine's parameter checks with
its `RequestPolicy`, once per request, the context length, admission) runs before the response starts; the stream
then only carries text. Per choice, an IncrementalDetokenizer and a StopChecker turn token ids into text deltas; a
stop-string hit ends that choice and aborts its engine sequence. SSE chunks keep their null fields; the usage chunk
has `"choices": []`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from engine.errors import InvalidParam
from engine.sequence import MAX_LOGPROBS, RequestOutput, SamplingParams
from server.async_engine import AsyncEngine, EngineDeadError, Generation, Overloaded, RequestFailedError
from server.config import ServerConfig
from server.detokenizer import IncrementalDetokenizer, StopChecker
from server.disconnect import race_disconnect, until_disconnect
from server.logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from server.metrics import ServerMetrics
from server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, error_body
from server.request_fields import CHAT, COMPLETIONS, body_fields, check_fields
from server.request_mapping import control_kwargs, prompt_logprobs_field, truncate
from server.structured_outputs import GrammarSpec, StructuredOutputs, spec_of
from server.tools import ToolOutput, plan, template_messages, tool_finish_reason

SAMPLING_EPS = 1e-5  # as vLLM: a smaller temperature is greedy (1e-300 would overflow the logits)
LOOP_TOKENIZE_CHARS = 4096  # longer texts are tokenized in a worker thread

log = logging.getLogger("trimode.server")


class APIError(Exception):
    """An error answered in OpenAI's shape before any response byte is sent."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.status, self.message, self.param), self.status, headers=self.headers)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse(obj: Any) -> bytes:
    return f"data: {_dumps(obj)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


if sys.version_info >= (3, 11):
    async def _within(awaitable: Awaitable[None], seconds: float) -> None:
        async with asyncio.timeout(seconds):  # a timer, not a task per send (the hot path of every stream)
            await awaitable
else:  # pragma: no cover
    async def _within(awaitable: Awaitable[None], seconds: float) -> None:
        await asyncio.wait_for(awaitable, seconds)


class _WriteTimeout(Exception):
    """One send of the stream waited write_timeout seconds: the client has stopped reading."""


class SSEResponse(StreamingResponse):
    """text/event-stream that always races the body against http.disconnect (whatever the ASGI spec version),
    so a vanished client cancels the body iterator at once.

    Each send is bounded by `write_timeout`: a send blocks only while the transport's buffers are full, i.e. the
    client has stopped reading, and then the stream ends as on a disconnect (the body iterator is closed, which
    aborts the request in the engine and counts a client disconnect; `on_end` runs in any case). The connection
    itself is left to the connection layer: an ASGI app cannot abort its transport, and returning would let uvicorn
    `close()` it, which waits for the unread bytes (and keeps server.http_protocol's write deadline, which
    aborts it, from firing), so the response waits for the disconnect that deadline causes."""

    def __init__(self, content: AsyncIterator[bytes], write_timeout: float | None = None,
                 on_end: Callable[[], None] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.write_timeout = write_timeout
        self.on_end = on_end

    async def _send_within(self, send: Send, message: Message) -> None:
        if self.write_timeout is None:
            await send(message)
            return
        try:
            await _within(send(message), self.write_timeout)
        except asyncio.TimeoutError:
            raise _WriteTimeout from None

    async def _end_body(self) -> None:
        """Close the body iterator now (not at garbage collection): a generator left at a `yield` (its send was
        cancelled) runs its cleanup, which aborts the request."""
        aclose = getattr(self.body_iterator, "aclose", None)
        if aclose is not None:
            await aclose()
        if self.on_end is not None:
            self.on_end()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def bounded_send(message: Message) -> None:
            await self._send_within(send, message)

        try:
            done = await race_disconnect(self.stream_response(bounded_send), receive)
            if done is not None and not done.cancelled() and isinstance(done.exception(), _WriteTimeout):
                log.info("stream ended: the client read nothing for write_timeout %gs", self.write_timeout)
                await self._end_body()
                await until_disconnect(receive)  # the connection layer drops the connection (see the docstring)
        finally:
            await self._end_body()


@dataclass
class ChoiceState:
    index: int
    detok: IncrementalDetokenizer | None
    stop: StopChecker
    prefix: str = ""  # echo: the prompt text, sent before the first output text
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: list[str] = field(default_factory=list)
    num_output_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # every token's, when the request asked for logprobs
    logprobs_sent: int = 0  # streaming: how many of them went out already
    prompt_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # echo + logprobs: the prompt's, until sent
    text_offset: int = 0  # completions logprobs: characters before the next token's text
    num_cached_tokens: int = 0  # prompt tokens the engine found in its prefix cache for this choice
    echo_logprobs: bool = False  # completions echo + logprobs: the prompt's logprobs lead the choice's
    want_prompt_logprobs: bool = False  # vLLM's prompt_logprobs field
    prompt_lp_items: list[TokenLogprob] | None = None  # ... its entries, once the engine sent them
    return_ids: bool = False  # vLLM's return_token_ids: output (and prompt) token ids in the response
    output_ids: list[int] = field(default_factory=list)
    ids_sent: int = 0  # streaming: output ids already sent
    as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs tokens spelled token_id:ID
    min_tokens: int = 0  # stop strings are looked for only after this many output tokens
    tools: ToolOutput | None = None  # chat with tools: the choice's calls, parsed from its text

    def render_output(self, out: RequestOutput, gen: Generation) -> str:
        """Turn one engine output into emit-ready text; ends the choice on a stop string or engine finish."""
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)  # an abort's output says 0
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(zip(out.new_token_ids, out.logprobs))
        if out.prompt_logprobs is not None:
            items = list(zip(self.prompt_ids, out.prompt_logprobs))
            self.prompt_logprobs = items if self.echo_logprobs else None
            self.prompt_lp_items = items if self.want_prompt_logprobs else None
        if self.return_ids:
            self.output_ids.extend(out.new_token_ids)
        final = out.finish_reason is not None
        ids, early = out.new_token_ids, ""
        # vLLM: stop strings are not looked for in the text of the first min_tokens tokens
        held = min(len(ids), max(0, self.min_tokens - (out.num_output_tokens - len(ids))))
        if held and self.detok is not None:
            early, _ = self.stop.push(self.detok.add(ids[:held]), match=False)
            ids = ids[held:]
        delta = self.detok.add(ids) if self.detok is not None else ""
        if final and self.detok is not None:
            delta += self.detok.flush()
        emit, stopped = self.stop.push(delta, final=final)
        emit = early + emit
        if stopped and self.stop.stop_reason is not None:
            self.finish_reason, self.stop_reason = "stop", self.stop.stop_reason
            if not final:
                gen.finish(self.index, "stop")
        elif final:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason
        if self.prefix and (emit or self.finish_reason):
            emit, self.prefix = self.prefix + emit, ""
        self.text.append(emit)
        return emit


@dataclass
class OpenAIServing:
    """The two generation endpoints over one AsyncEngine."""

    async_engine: AsyncEngine
    config: ServerConfig
    metrics: ServerMetrics
    model_name: str
    _max_chars: int | None = None
    _grammars: StructuredOutputs | None = None

    # ---- validation ---------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:  # omitted or empty: the served model (as vLLM)
            raise APIError(404, f"The model `{model[:200]}` does not exist.", "model")

    def _check_common(self, req: CompletionRequest | ChatCompletionRequest) -> list[str]:
        self.check_model(req.model)
        cfg = self.config
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "Stream options can only be defined when `stream=True`.", "stream_options")
        if req.n > cfg.max_n:
            raise APIError(400, f"n must be <= {cfg.max_n}, got {req.n}", "n")
        try:
            check_fields(body_fields(req), CHAT if isinstance(req, ChatCompletionRequest) else COMPLETIONS)
        except InvalidParam as exc:
            raise _bad_request(exc) from None
        if req.prompt_logprobs is not None and req.stream:
            raise APIError(400, "prompt_logprobs are not available when stream is true", "prompt_logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > cfg.max_stop_strings:
            raise APIError(400, f"at most {cfg.max_stop_strings} stop strings are allowed, got {len(stop)}", "stop")
        if any(len(s) > cfg.max_stop_string_len for s in stop):
            raise APIError(400, f"stop strings must be at most {cfg.max_stop_string_len} characters", "stop")
        if req.stop_token_ids and len(req.stop_token_ids) > 256:
            raise APIError(400, "at most 256 stop_token_ids are allowed", "stop_token_ids")
        return stop

    def _params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        try:
            params = SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else 16,
                temperature=1.0 if req.temperature is None else 0.0 if req.temperature < SAMPLING_EPS
                else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k is None else req.top_k,
                seed=req.seed, stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
                mode=req.mode, steps=req.steps, block_length=req.block_length, threshold=req.threshold,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs, cache_salt=req.cache_salt,
                **control_kwargs(req, self.async_engine.tokenizer))
            return self.async_engine.policy.resolve_params(params)
        except ValueError as exc:
            raise _bad_request(exc) from None

    def _fit(self, ids: list[int], params: SamplingParams, fill: bool, prompt_field: str) -> SamplingParams:
        """Check the request once against the engine's policy (context, vocabulary, forward cap); with `fill`
        (chat, no max_tokens) it runs with the largest max_tokens within both the context and the forward cap.
        A prompt that leaves no room is refused with the context error for the one token it cannot have."""
        policy = self.async_engine.policy
        if fill:
            params = replace(params, max_tokens=max(1, policy.largest_max_tokens(len(ids), params)))
        try:
            policy.check_request(ids, params)
        except ValueError as exc:
            raise _bad_request(exc, prompt_field) from None
        return params

    def require_tokenizer(self, what: str) -> Any:
        tok = self.async_engine.tokenizer
        if tok is None:
            raise APIError(400, f"this model ships no tokenizer: {what} needs one; send token ids", what)
        return tok

    # ---- endpoints ----------------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest) -> Response:
        stop = self._check_common(req)
        if req.suffix is not None:
            raise APIError(400, "suffix is not currently supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported", "best_of")
        prompts = await self._completion_prompts(req.prompt, req.add_special_tokens)
        if req.truncate_prompt_tokens is not None:  # the echo shows what the model saw
            cut = [(truncate(ids, req.truncate_prompt_tokens, req.truncation_side), ids, text) for ids, text in prompts]
            prompts = [(kept, text if kept is ids else None) for kept, ids, text in cut]
        prompt_lps = req.prompt_logprobs if req.prompt_logprobs is not None else req.logprobs if req.echo else None
        base = self._params(req, req.max_tokens, req.logprobs, prompt_lps)
        base = await self._constrained(base, self._spec(req))
        tok = self.async_engine.tokenizer
        items: list[tuple[list[int], SamplingParams]] = []
        states: list[ChoiceState] = []
        for ids, text in prompts:
            params = self._fit(ids, base, req.max_tokens is None, "prompt")
            echo = "" if not req.echo else text if text is not None else (tok.decode(ids) if tok else "")
            for j in range(req.n):
                items.append((ids, _seeded(params, j)))
                states.append(self._extended(self._choice(len(states), ids, stop, req.include_stop_str_in_output,
                                                          echo), req))
        return await self._respond("cmpl", "text_completion", req, items, states,
                                   sum(len(ids) for ids, _ in prompts))

    async def chat(self, req: ChatCompletionRequest) -> Response:
        stop = self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        if req.top_logprobs is not None and req.top_logprobs > MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {req.top_logprobs}",
                           "top_logprobs")
        spec = self._spec(req)
        try:
            tool_plan = plan(req.tools, req.tool_choice, req.parallel_tool_calls)
        except InvalidParam as exc:
            raise _bad_request(exc) from None
        if tool_plan is not None and tool_plan.grammar is not None:  # required / named: calls by grammar
            if spec is not None:
                raise APIError(400, f"tool_choice {tool_plan.choice} cannot be combined with {spec.field}",
                               "tool_choice")
            spec = tool_plan.grammar
        if req.continue_final_message and req.add_generation_prompt:
            raise APIError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                           "continue_final_message")
        ids = await self.chat_ids(req.messages, req.tools if tool_plan is not None else None,
                                  add_generation_prompt=req.add_generation_prompt,
                                  continue_final_message=req.continue_final_message,
                                  template_kwargs=req.chat_template_kwargs, add_special_tokens=req.add_special_tokens)
        ids = truncate(ids, req.truncate_prompt_tokens, req.truncation_side)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._fit(ids, self._params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                                             req.prompt_logprobs), max_tokens is None, "messages")
        params = await self._constrained(params, spec)
        items = [(ids, _seeded(params, j)) for j in range(req.n)]
        echo = chat_echo(req)
        states = [self._extended(self._choice(j, ids, stop, req.include_stop_str_in_output, echo), req)
                  for j in range(req.n)]
        if tool_plan is not None:
            for s in states:
                s.tools = ToolOutput.for_plan(tool_plan, self.config.tool_call_parser)
        return await self._respond("chatcmpl", "chat.completion", req, items, states, len(ids))

    # ---- structured outputs -------------------------------------------------------------------------------
    @staticmethod
    def _spec(req: CompletionRequest | ChatCompletionRequest) -> GrammarSpec | None:
        try:
            return spec_of(req)
        except InvalidParam as exc:
            raise _bad_request(exc) from None

    async def _constrained(self, params: SamplingParams, spec: GrammarSpec | None) -> SamplingParams:
        """`params` carrying `spec` compiled (in a worker thread, cached by the spec); 400 naming the field."""
        if spec is None:
            return params
        tok = self.require_tokenizer(spec.field)
        if self._grammars is None:
            self._grammars = StructuredOutputs(tok, self.async_engine.policy.vocab_size)
        try:
            return replace(params, structured=await self._grammars.compiled(spec))
        except InvalidParam as exc:
            raise _bad_request(exc) from None

    # ---- prompts ------------------------------------------------------------------------------------------
    async def _completion_prompts(self, prompt: Any,
                                  add_special_tokens: bool = True) -> list[tuple[list[int], str | None]]:
        if isinstance(prompt, str):
            raw: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            raw = [list(prompt)]
        else:
            raw = list(prompt)
        if not raw:
            raise APIError(400, "prompt must not be empty", "prompt")
        if len(raw) > self.config.max_prompts:
            raise APIError(400, f"at most {self.config.max_prompts} prompts per request, got {len(raw)}", "prompt")
        out: list[tuple[list[int], str | None]] = []
        for p in raw:
            if isinstance(p, str):
                if not p:
                    raise APIError(400, "prompt must not be empty", "prompt")
                out.append((await self.encode(p, "prompt", add_special_tokens), p))
            else:
                if not p:
                    raise APIError(400, "prompt must not be empty", "prompt")
                out.append((list(p), None))
        return out

    def _check_chars(self, num_chars: int, what: str) -> None:
        """Refuse, without tokenizing, text longer than any max_model_len-token text can be."""
        if self._max_chars is None:
            tok = self.async_engine.tokenizer
            self._max_chars = self.async_engine.max_model_len * max((len(t) for t in tok.get_vocab()), default=1)
        if num_chars > self._max_chars:
            raise APIError(400, f"This model's maximum context length is {self.async_engine.max_model_len} tokens, and "
                           f"the {what} ({num_chars} characters) is longer than any text of that many tokens.",
                           what)

    async def encode(self, text: str, what: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize; long texts off the event loop (the tokenizer releases the GIL), absurd ones not at all."""
        tok = self.require_tokenizer(what)
        self._check_chars(len(text), what)
        if len(text) <= LOOP_TOKENIZE_CHARS:
            return list(tok.encode(text, add_special_tokens=add_special_tokens))
        return list(await asyncio.to_thread(tok.encode, text, add_special_tokens=add_special_tokens))

    async def chat_ids(self, messages: list[ChatMessage], tools: list[Any] | None = None, *,
                       add_generation_prompt: bool = True, continue_final_message: bool = False,
                       template_kwargs: dict[str, Any] | None = None, add_special_tokens: bool = False) -> list[int]:
        """The chat template applied to `messages` (plus the assistant prompt unless told otherwise, `tools` when
        given, and the client's `chat_template_kwargs`), as token ids."""
        tok = self.require_tokenizer("messages")
        msgs = template_messages(messages)
        self._check_chars(sum(len(m["content"]) for m in msgs), "messages")
        clash = sorted(set(template_kwargs or ()) & RESERVED_TEMPLATE_KWARGS)
        if clash:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
        try:
            extra = {"tools": tools} if tools else {}
            if continue_final_message:
                extra["continue_final_message"] = True
            text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False,
                                           **(template_kwargs or {}), **extra)
        except Exception as exc:  # template errors (jinja raise_exception, missing template) are the user's
            raise APIError(400, f"chat template error: {exc}"[:500], "messages") from None
        return await self.encode(text, "messages", add_special_tokens=add_special_tokens)

    def _choice(self, index: int, ids: list[int], stop: list[str], include_stop: bool, echo: str) -> ChoiceState:
        tok = self.async_engine.tokenizer
        detok = IncrementalDetokenizer(tok, ids) if tok is not None else None
        return ChoiceState(index, detok, StopChecker(stop, include_stop), prefix=echo, text_offset=len(echo),
                           prompt_ids=ids)

    def _extended(self, s: ChoiceState, req: CompletionRequest | ChatCompletionRequest) -> ChoiceState:
        """`s` with the request's vLLM output options (special tokens in the text, token ids, prompt logprobs)."""
        tok = self.async_engine.tokenizer
        if tok is not None and (not req.skip_special_tokens or not req.spaces_between_special_tokens):
            s.detok = IncrementalDetokenizer(tok, s.prompt_ids, req.skip_special_tokens,
                                             req.spaces_between_special_tokens)
        s.echo_logprobs = isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None
        s.want_prompt_logprobs = req.prompt_logprobs is not None
        s.return_ids = bool(req.return_token_ids)
        s.as_ids = bool(req.return_tokens_as_token_ids)
        s.min_tokens = req.min_tokens
        return s

    # ---- running ------------------------------------------------------------------------------------------
    async def _respond(self, id_prefix: str, obj: str, req: CompletionRequest | ChatCompletionRequest,
                       items: list[tuple[list[int], SamplingParams]], states: list[ChoiceState],
                       num_prompt_tokens: int) -> Response:
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        timeout = req.timeout if req.timeout is not None else self.config.request_timeout
        try:
            gen = self.async_engine.generate(request_id, items, timeout)
        except Overloaded as exc:
            self.metrics.reject(exc.reason)
            raise APIError(503, str(exc), headers={"Retry-After": str(self.config.retry_after)}) from None
        except EngineDeadError:
            self.metrics.reject("engine_dead")
            raise APIError(503, "The engine is dead; the server cannot serve requests.") from None
        mode = items[0][1].mode or "ar"
        head = {"id": request_id, "object": obj, "created": int(time.time()), "model": self.model_name}
        try:
            first = await self._first(gen)
        except BaseException:
            gen.close()
            raise
        if req.stream:
            opts = req.stream_options
            include_usage = bool(opts and opts.include_usage)
            continuous = include_usage and bool(opts and opts.continuous_usage_stats)  # vLLM: usage in every chunk
            chat = obj == "chat.completion"
            return SSEResponse(self._stream(gen, first, states, head, mode, chat, include_usage, continuous,
                                            num_prompt_tokens, req.n), self.config.write_timeout, gen.close)
        try:
            item: tuple[int, RequestOutput] | None = first
            while item is not None:
                if states[item[0]].finish_reason is None:  # else: stale output of a choice a stop string ended
                    states[item[0]].render_output(item[1], gen)
                item = None if _all_done(states) else await gen.next()
        except (EngineDeadError, RequestFailedError) as exc:
            raise APIError(500, str(exc)) from None
        finally:
            gen.close()
        completion_tokens = sum(s.num_output_tokens for s in states)
        tok = self.async_engine.tokenizer
        body = dict(head, choices=[_final_choice(s, obj, tok) for s in states],
                    usage=_usage(num_prompt_tokens, completion_tokens, _cached_tokens(states, req.n)), mode=mode,
                    **_chat_extras(states, obj, tok))
        return Response(_dumps(body), media_type="application/json")

    async def _first(self, gen: Generation) -> tuple[int, RequestOutput]:
        """The first output, before any response byte: queue timeout -> 503, dead engine -> 500."""
        try:
            return await asyncio.wait_for(gen.next(), self.config.queue_timeout)
        except asyncio.TimeoutError:
            self.metrics.reject("queue_timeout")
            raise APIError(503, "Request queue timeout reached.",
                           headers={"Retry-After": str(self.config.retry_after)}) from None
        except (EngineDeadError, RequestFailedError) as exc:
            raise APIError(500, str(exc)) from None
        except ValueError as exc:
            raise _bad_request(exc) from None

    async def _stream(self, gen: Generation, first: tuple[int, RequestOutput], states: list[ChoiceState],
                      head: dict[str, Any], mode: str, chat: bool, include_usage: bool, continuous: bool,
                      num_prompt_tokens: int, n: int) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = dict(head, object=obj)
        tok = self.async_engine.tokenizer

        def usage() -> dict[str, dict[str, Any]]:
            return {"usage": _usage(num_prompt_tokens, sum(s.num_output_tokens for s in states),
                                    _cached_tokens(states, n))}

        try:
            if chat:
                for s in states:
                    role = {"index": s.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}
                    yield sse(dict(base, choices=[role], **(usage() if continuous else {}), mode=mode,
                                   **_chat_extras(states[:1], "chat.completion", tok)))
            item: tuple[int, RequestOutput] | None = first
            while item is not None:
                # whatever piled up while this stream was being written goes out as one chunk per choice
                texts: dict[int, str] = {}
                for index, out in [item, *gen.ready()]:
                    state = states[index]
                    if state.finish_reason is None:
                        texts[index] = texts.get(index, "") + state.render_output(out, gen)
                for index, text in texts.items():
                    state = states[index]
                    if text or state.finish_reason is not None:
                        yield sse(dict(base, choices=[_chunk_choice(state, text, chat, tok)],
                                       **(usage() if continuous else {}), mode=mode))
                item = None if _all_done(states) else await gen.next()
            if include_usage:
                yield sse(dict(base, choices=[], **usage(), mode=mode))
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (cancelled, or closed between chunks)
            self.metrics.client_disconnected.labels(self.model_name).inc()
            raise
        except Exception as exc:  # after the 200: an error event, then [DONE]
            status = 500 if isinstance(exc, EngineDeadError) else 400 if isinstance(exc, ValueError) else 500
            yield sse(error_body(status, str(exc) or type(exc).__name__))
        finally:
            gen.close()
        yield SSE_DONE


def _all_done(states: list[ChoiceState]) -> bool:
    return all(s.finish_reason is not None for s in states)


def _seeded(params: SamplingParams, j: int) -> SamplingParams:
    return params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)


def _cached_tokens(states: list[ChoiceState], n: int) -> int:
    """Prompt tokens served from the prefix cache, each prompt counted once as in `prompt_tokens`: its first
    choice's (what the cache held when the request came; its other choices share the first one's blocks)."""
    return sum(s.num_cached_tokens for s in states[::n])


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _logprobs(s: ChoiceState, chat: bool, tok: Any, start: int) -> dict[str, Any] | None:
    """The choice's logprobs object for its tokens from `start` on (None when the request asked for none)."""
    if s.logprobs is None:
        return None
    items = s.logprobs[start:]
    if chat:
        return chat_logprobs(tok, items, s.as_ids)
    out, s.text_offset = completion_logprobs(tok, items, s.text_offset, s.as_ids)
    if s.prompt_logprobs is not None:  # echo: the prompt's entries lead, with the first chunk that has any
        head, _ = completion_logprobs(tok, s.prompt_logprobs, 0, s.as_ids)
        out = {key: head[key] + out[key] for key in out}
        s.prompt_logprobs = None
    return out


def _chunk_choice(s: ChoiceState, text: str, chat: bool, tok: Any) -> dict[str, Any]:
    # the logprobs of every token not sent yet, including tokens whose text is still held back
    start, s.logprobs_sent = s.logprobs_sent, len(s.logprobs or ())
    lps = _logprobs(s, chat, tok, start) if s.logprobs_sent > start else None
    if chat:
        delta: dict[str, Any] = {"content": text} if text else {}
        if s.tools is not None:  # tool calls leave as OpenAI's deltas; the text around them as content
            content, calls = s.tools.delta(text, s.finish_reason is not None)
            delta = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = calls
            return {"index": s.index, "delta": delta, "logprobs": lps,
                    "finish_reason": tool_finish_reason(s.tools, s.tools.called, s.finish_reason)}
        return {"index": s.index, "delta": delta, "logprobs": lps, "finish_reason": s.finish_reason,
                **_ids_delta(s, False)}
    return {"index": s.index, "text": text, "logprobs": lps, "finish_reason": s.finish_reason,
            "stop_reason": s.stop_reason, **_ids_delta(s, True)}


def _final_choice(s: ChoiceState, obj: str, tok: Any) -> dict[str, Any]:
    text = "".join(s.text)
    if obj == "chat.completion":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        reason = s.finish_reason
        if s.tools is not None:
            content, calls = s.tools.final(text, reason)
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            reason = tool_finish_reason(s.tools, bool(calls), reason)
        return {"index": s.index, "message": message, "logprobs": _logprobs(s, True, tok, 0),
                "finish_reason": reason, "stop_reason": s.stop_reason,
                **({"token_ids": s.output_ids} if s.return_ids else {})}
    extras: dict[str, Any] = {}
    if s.want_prompt_logprobs:
        extras["prompt_logprobs"] = _prompt_logprobs(s, tok)
    if s.return_ids:
        extras.update(prompt_token_ids=s.prompt_ids, token_ids=s.output_ids)
    return {"index": s.index, "text": text, "logprobs": _logprobs(s, False, tok, 0),
            "finish_reason": s.finish_reason, "stop_reason": s.stop_reason, **extras}


def _prompt_logprobs(s: ChoiceState, tok: Any) -> list[Any] | None:
    if s.prompt_lp_items is None:
        return None
    return prompt_logprobs_field(tok, [t for t, _ in s.prompt_lp_items], [lp for _, lp in s.prompt_lp_items])


def _chat_extras(states: list[ChoiceState], obj: str, tok: Any) -> dict[str, Any]:
    """Chat's response-level vLLM extensions (the prompt is every choice's): prompt_token_ids, prompt_logprobs."""
    if obj != "chat.completion" or not states:
        return {}
    s = states[0]
    out: dict[str, Any] = {}
    if s.return_ids:
        out["prompt_token_ids"] = s.prompt_ids
    if s.want_prompt_logprobs:
        out["prompt_logprobs"] = _prompt_logprobs(s, tok)
    return out


def _ids_delta(s: ChoiceState, completions: bool) -> dict[str, Any]:
    """Streaming with return_token_ids: the output ids not sent yet (and a completion choice's prompt ids first)."""
    if not s.return_ids:
        return {}
    out: dict[str, Any] = {}
    if completions and s.ids_sent == 0:
        out["prompt_token_ids"] = s.prompt_ids
    out["token_ids"], s.ids_sent = s.output_ids[s.ids_sent:], len(s.output_ids)
    return out


def chat_echo(req: ChatCompletionRequest) -> str:
    """vLLM's chat `echo`: the last message's text when it has the response's role (assistant, or the last
    message's own role without a generation prompt)."""
    if not req.echo:
        return ""
    role = "assistant" if req.add_generation_prompt else req.messages[-1].role
    last = template_messages(req.messages[-1:])[0]
    return last["content"] if req.messages[-1].role == role else ""


# chat_template_kwargs may not override what the server itself passes to the template
RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "tokenize", "add_generation_prompt",
                                      "continue_final_message", "chat_template", "return_dict", "documents"})


def _bad_request(exc: ValueError, prompt_field: str = "prompt") -> APIError:
    """A 400 for an engine ValueError: `param` is the InvalidParam's field, with the engine's `prompt` named as the
    client sent it (`messages` for chat)."""
    param = exc.field if isinstance(exc, InvalidParam) else None
    if param == "prompt":
        param = prompt_field
    return APIError(400, str(exc), param)
