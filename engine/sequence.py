"""Per-request types: SamplingParams (what the user asked), Sequence (engine state), RequestOutput (what leaves);
and StepStats, what one engine step reports to the metrics. Torch-free: the server process imports it.

Invariant after prefill, in every mode: `num_computed_tokens == len(token_ids) - 1`. The newest emitted token
(the seed) is the only one whose K/V is not yet committed; tentative tokens (diffusion blocks being denoised,
self_spec drafts) live in the decoder's `state`, never in `token_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.decoding.modes import MODES
from engine.errors import InvalidParam
from engine.forward import Forward
from engine.structured import GrammarSpec

MAX_LOGPROBS = 20  # most alternatives per token (vLLM's default max_logprobs)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding knobs. `None` means "the engine's default" for the mode knobs."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    mode: str | None = None  # ar | diffusion | self_spec
    steps: int | None = None  # diffusion: refinement-step budget per block (1..block_length); None = block_length
    block_length: int | None = None  # diffusion / self_spec block length L; None = engine default
    threshold: float | None = None  # diffusion: commit confidence in (0, 1]; self_spec: None = one-shot draft
    logprobs: int | None = None  # per emitted token: its logprob and the top-N alternatives (0..20); None = off
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (0..20); None = off
    # prefix caching: only requests with the same salt share cached KV blocks (vLLM's `cache_salt`); None = none
    cache_salt: str | None = None
    structured: GrammarSpec | None = None  # a grammar every output token obeys (engine.grammar), compiled by the server
    # sampling controls (engine.logits_processing applies them at every token choice, in every mode)
    presence_penalty: float = 0.0  # [-2, 2], over output tokens
    frequency_penalty: float = 0.0  # [-2, 2], over output tokens
    repetition_penalty: float = 1.0  # [0.01, 100], over prompt and output tokens (1 = off)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    min_tokens: int = 0  # stop ids held back until this many tokens were emitted (<= max_tokens)
    min_p: float = 0.0  # [0, 1]: drop tokens below min_p * the top token's probability (T > 0)
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be chosen
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()  # token sequences that must not be produced

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._check_controls()
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidParam("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0 <= self.temperature < float("inf"):  # also rejects NaN
            raise InvalidParam("temperature", f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.temperature < 1e-5:
            # as vLLM: below this, logits / T overflow to inf and softmax turns NaN; it is greedy in effect
            object.__setattr__(self, "temperature", 0.0)
        if not 0 < self.top_p <= 1:
            raise InvalidParam("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidParam("top_k", f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        if self.mode is not None and self.mode not in MODES:
            raise InvalidParam("mode", f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.block_length is not None and self.block_length < 2:
            raise InvalidParam("block_length", f"block_length must be >= 2, got {self.block_length}")
        if self.steps is not None and self.steps < 1:
            raise InvalidParam("steps", f"steps must be >= 1, got {self.steps}")
        if self.steps is not None and self.block_length is not None and self.steps > self.block_length:
            raise InvalidParam("steps", f"steps must be <= block_length ({self.block_length}), got {self.steps}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise InvalidParam("threshold", f"threshold must be in (0, 1], got {self.threshold}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidParam(name, f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise InvalidParam("cache_salt", f"cache_salt must be a non-empty string, got {self.cache_salt!r}")

    def _check_controls(self) -> None:
        """Ranges of the sampling controls (vLLM's); token ids against the vocabulary: `RequestPolicy`."""
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # also rejects NaN
                raise InvalidParam(name, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        # bounded so that logit / penalty stays finite (5e-324 made every seen token's logit inf, and softmax NaN)
        if not 0.01 <= self.repetition_penalty <= 100.0:
            raise InvalidParam("repetition_penalty",
                               f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidParam("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidParam("min_tokens", f"min_tokens must be an integer between 0 and max_tokens "
                               f"({self.max_tokens}), got {self.min_tokens!r}")
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        for t, b in bias:
            if not -100.0 <= b <= 100.0:
                raise InvalidParam("logit_bias", f"logit_bias values must be in [-100, 100], got {b} for token {t}")
        object.__setattr__(self, "logit_bias", bias)
        if self.allowed_token_ids is not None:
            allowed = tuple(int(t) for t in self.allowed_token_ids)
            if not allowed:
                raise InvalidParam("allowed_token_ids", "allowed_token_ids must not be empty")
            object.__setattr__(self, "allowed_token_ids", allowed)
        words = tuple(tuple(int(t) for t in w) for w in self.bad_words_token_ids)
        if any(not w for w in words):
            raise InvalidParam("bad_words", "bad_words must not contain an empty word")
        object.__setattr__(self, "bad_words_token_ids", words)

    def token_id_fields(self) -> dict[str, list[int]]:
        """Every token id the request names, by the field to blame (checked against the vocabulary)."""
        return {"stop_token_ids": list(self.stop_token_ids),
                "logit_bias": [t for t, _ in self.logit_bias],
                "allowed_token_ids": list(self.allowed_token_ids or ()),
                "bad_words": [t for w in self.bad_words_token_ids for t in w]}


@dataclass(frozen=True, slots=True)
class Logprob:
    """One emitted token's log-probability under the distribution it was chosen from, and the top-N there.

    The distribution is the model's own (log-softmax of the logits with the mask id excluded), before temperature,
    top-k and top-p, as vLLM reports by default: the causal row for ar, prefill and self_spec (the verify row, so
    self_spec's logprobs are ar's), the denoise row of the step that committed the token for diffusion (and the
    commit row for each block's seed)."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first
    rank: int = 1  # 1 + how many tokens are more likely (vLLM's prompt_logprobs report it)


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt + emitted output
    num_prompt_tokens: int
    params: SamplingParams  # resolved: mode, block_length and steps are never None here
    stop_ids: frozenset[int]  # EOS set (unless ignore_eos) + stop_token_ids
    arrival_time: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V is committed in the cache
    block_table: list[int] = field(default_factory=list)
    state: Any = None  # decoder-owned per-mode state (current block, drafts, ...)
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: int | None = None  # the stop token id that ended it (None for EOS, as vLLM)
    num_forwards: int = 0  # every forward this sequence took part in, prefill included
    num_decode_forwards: int = 0  # forwards after prefill (tokens per forward = output tokens / this)
    last_scheduled: int = -1  # engine step it last ran in (under the token budget the oldest go first)
    generator: Any = None  # torch.Generator for sampling (seeded per request, or from the engine's RNG)
    sample_after_prefill: bool = True  # the prefill's last logit gives the next token (False after preemption)
    prompt_lps: dict[int, Any] = field(default_factory=dict)  # prompt position -> Logprob, until the first output
    # prefix cache (engine/kv_cache.py): hashes of the full token blocks so far (tokens only grow), how many of
    # `block_table`'s leading blocks were registered or taken from the cache, and the prompt tokens found cached at
    # the first admission (None before it)
    block_hashes: list[bytes] = field(default_factory=list)
    num_hashed_blocks: int = 0
    num_cached_tokens: int | None = None
    logits_pipeline: Any = None  # engine.logits_processing.LogitsPipeline; None: the request sets no control

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prefill_target(self) -> int:
        """Tokens whose K/V prefill must compute: the prompt, or after preemption everything but the seed."""
        return len(self.token_ids) - (0 if self.sample_after_prefill else 1)

    @property
    def is_prefilling(self) -> bool:
        # a decoder mid-block (e.g. a resolved diffusion block awaiting its commit) is past prefill
        return self.state is None and self.num_computed_tokens < self.prefill_target


@dataclass
class RequestOutput:
    """What one engine step says about one request: tokens emitted this step, and the end if it ended."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None  # None while running; stop | length | abort
    stop_reason: int | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_forwards: int
    num_decode_forwards: int
    mode: str
    logprobs: list[Logprob] | None = None  # one per new token when the request asked for logprobs
    prompt_logprobs: list[Logprob | None] | None = None  # with the first output: one per prompt token (first: None)
    decoded: str | None = None  # with the finish, how an `auto` request was decoded (iterations by choice)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (usage.prompt_tokens_details)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepStats:
    """Counters from one engine step, for /metrics (plain values; the server accumulates them).

    `counters` and `observations` are the decoders' own (`engine.decoding.modes` names them), summed over the
    step's outcomes by the engine without knowing what they mean."""

    num_model_forwards: int = 0  # weight passes: 1 when the step ran the model (every kind rides in that one)
    forward_kind: Forward | None = None  # the forward's leading section (None when the step ran none)
    batch_size: int = 0  # sequences in the forward, all sections
    num_query_tokens: int = 0
    seqs_by_forward: dict[Forward, int] = field(default_factory=dict)  # forward kind -> its sequences in the forward
    rows_by_forward: dict[Forward, int] = field(default_factory=dict)  # forward kind -> its query rows (tokens)
    decode_forwards_by_mode: dict[str, int] = field(default_factory=dict)  # mode -> sequences in the forward
    counters: dict[str, int] = field(default_factory=dict)  # name -> sum over the step's outcomes
    observations: dict[str, list[float]] = field(default_factory=dict)  # name -> every outcome's value, in order
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache at first admission
    prefix_cache_hits: int = 0  # of those, tokens found cached (their prefill skipped)
