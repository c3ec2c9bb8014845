"""RequestPolicy: what a request may ask of one loaded engine, checked without touching the model.

A small frozen value (picklable), so the server can validate requests in its own process when the engine runs in
another: the engine process builds it after loading and ships it over. The server resolves and checks each request
with it once (`server.serving`) and the engine admits what was checked (`Engine.admit`); callers without a server
(`Engine.add_request`: `engine.llm.LLM`, benches) are checked with the same policy, so both give the same answer
and the same `InvalidParam`.

It also prices a request in the two resources a request cannot give back early: KV pages (`kv_pages`, what the
server's admission sums against the pool) and decode forwards (`max_decode_forwards`, capped per request by
`max_forwards`, and inverted by `max_tokens_within_forwards` for a request that leaves max_tokens to the server).
Both are worst cases derived from the decoders in `engine/decoding/`; `tests/server/test_admission.py` checks them
against what the engine really allocates and runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from engine.errors import InvalidParam
from engine.sequence import SamplingParams


@dataclass(frozen=True)
class RequestPolicy:
    model_name: str
    is_trimode: bool
    vocab_size: int
    max_model_len: int
    default_mode: str
    default_block_length: int
    allowed_block_lengths: tuple[int, ...]
    default_threshold: float
    kv_page_size: int  # tokens per KV page (the BlockManager's block_size)
    kv_num_pages: int  # pages in the engine's KV pool (the BlockManager's num_blocks)
    max_forwards: int  # decode forwards one request may need in the worst case ([engine] max_forwards_per_request)

    def resolve_params(self, params: SamplingParams) -> SamplingParams:
        """Fill the mode knobs' defaults and check them against this engine; ValueError names the field."""
        mode = params.mode or (self.default_mode if self.is_trimode else "ar")
        if mode not in ("ar", "auto") and not self.is_trimode:  # auto on a plain causal checkpoint decodes as ar
            raise InvalidParam("mode", f"mode '{mode}' needs a tri-mode checkpoint; {self.model_name} serves only 'ar'")
        if mode == "auto" and params.steps is not None:
            raise InvalidParam("steps", f"steps {params.steps}: a diffusion knob, and mode 'auto' never runs "
                               "diffusion (it chooses between ar and self_spec, whose output is the AR model's); "
                               "omit steps")
        block = params.block_length or self.default_block_length
        if block not in self.allowed_block_lengths:
            raise InvalidParam("block_length",
                               f"block_length must be one of {list(self.allowed_block_lengths)}, got {block}")
        steps = None if mode == "auto" else params.steps or block  # auto runs no diffusion: no step budget
        if steps is not None and steps > block:
            raise InvalidParam("steps", f"steps must be <= block_length ({block}), got {steps}")
        threshold = params.threshold
        if mode == "diffusion" and threshold is None:
            threshold = self.default_threshold
        return dataclasses.replace(params, mode=mode, block_length=block, steps=steps, threshold=threshold)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reject what can never run: empty or out-of-vocabulary prompts, context overflow, and a worst case of
        more decode forwards than `max_forwards`. `params` must be resolved."""
        if not prompt_token_ids:
            raise InvalidParam("prompt", "prompt must contain at least one token")
        vocab = self.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParam("prompt", f"prompt contains token id {bad!r} outside the vocabulary [0, {vocab})")
        for name, ids in params.token_id_fields().items():
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidParam(name, f"{name} contains token id {bad} outside the vocabulary [0, {vocab})")
        n, m = len(prompt_token_ids), params.max_tokens
        need = self._output_positions(params)
        if n + need > self.max_model_len:
            raise InvalidParam(
                "input_tokens",
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{m} output tokens and your prompt contains {n} input tokens, for a total of {n + need} tokens"
                f"{' (whole diffusion blocks)' if need != m else ''}. Please reduce the length of the input "
                f"prompt or the number of requested output tokens. (parameter=input_tokens, value={n})")
        self._check_forwards(params)

    # ---- prices ---------------------------------------------------------------------------------------------
    @staticmethod
    def _output_positions(params: SamplingParams) -> int:
        """KV positions past the prompt that one sequence may hold at once (the context check counts the same).

        ar writes one entry per token, self_spec's draft block never reaches past `max_tokens` (the decoder drafts
        at most `max_tokens - emitted - 1` tokens, and the bonus is the last), so both stay within `max_tokens`.
        diffusion denoises, then commits, whole blocks: the last block's positions count in full."""
        m = params.max_tokens
        assert params.block_length is not None
        return -(-m // params.block_length) * params.block_length if params.mode == "diffusion" else m

    def kv_pages(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """KV pages one sequence of this request may hold at its peak (`params` resolved)."""
        return -(-(num_prompt_tokens + self._output_positions(params)) // self.kv_page_size)

    @staticmethod
    def max_decode_forwards(params: SamplingParams) -> int:
        """Decode forwards one sequence may need in the worst case (`params` resolved; prefill not counted).

        The prefill's last logit gives the first token, so `max_tokens - 1` tokens are left for decoding:
        - ar: one forward per token;
        - diffusion: per block of L (L - 1 tokens and the next seed) a commit and up to `steps` denoise forwards,
          each committing at least one of the L - 1 masks;
        - self_spec: per round a verify that may accept no draft (one token), after one draft forward, or with a
          `threshold` up to one draft forward per masked position (each commits at least one), and a round drafts
          min(L - 1, tokens left - 1) positions;
        - auto: its rounds are ar or self_spec ones, so self_spec's price bounds it.
        """
        left = params.max_tokens - 1
        if left <= 0:
            return 0
        if params.mode == "ar":
            return left
        block = params.block_length
        assert block is not None and (params.steps is not None or params.mode == "auto")
        if params.mode == "diffusion":
            return -(-left // block) * (min(params.steps, block - 1) + 1)
        # self_spec (and auto), every round emitting one token: the rounds have r = left - 1, ..., 0 left to draft
        if params.threshold is None:
            drafts = left - 1  # one draft forward in each round with something to draft
        else:
            k, r = block - 1, left - 1
            drafts = r * (r + 1) // 2 if r <= k else k * (k + 1) // 2 + (r - k) * k  # sum of min(k, r') for r'<=r
        return left + drafts

    def max_tokens_within_forwards(self, params: SamplingParams) -> int:
        """The largest max_tokens whose `max_decode_forwards` stays within `max_forwards` (`params` resolved; its
        own max_tokens is ignored): `max_decode_forwards` inverted per mode, in closed form."""
        cap, left = self.max_forwards, 0  # left: decode tokens, max_tokens - 1
        if params.mode == "ar":
            left = cap
        elif params.mode == "diffusion":
            assert params.block_length is not None and params.steps is not None
            block = params.block_length
            left = cap // (min(params.steps, block - 1) + 1) * block  # whole blocks of (denoise steps + commit)
        elif params.threshold is None:  # self_spec / auto, one draft forward per round: 2 * left - 1 forwards
            left = (cap + 1) // 2
        else:  # drafting by threshold: left + sum of min(k, r') for r' <= r = left - 1
            assert params.block_length is not None
            k = params.block_length - 1
            r = (cap - 1 + k * (k - 1) // 2) // (k + 1)  # past the ramp (r > k): (k + 1) r + 1 - k (k - 1) / 2
            if r <= k:  # on the ramp (r <= k): (r + 1)(r + 2) / 2 forwards; the largest t = r + 1 with t(t+1)/2 <= cap
                r = (math.isqrt(8 * cap + 1) - 1) // 2 - 1
            left = r + 1
        return left + 1

    def max_tokens_within_context(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The largest max_tokens whose output positions fit in the context after the prompt (`params` resolved);
        diffusion counts whole blocks. 0 or less when nothing fits."""
        room = self.max_model_len - num_prompt_tokens
        if params.mode == "diffusion":
            assert params.block_length is not None
            return room // params.block_length * params.block_length
        return room

    def largest_max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The largest max_tokens this request may ask for: within the context and within the forward cap. What a
        chat request without max_tokens runs with (`params` resolved). 0 or less when the prompt leaves no room."""
        return min(self.max_tokens_within_context(num_prompt_tokens, params), self.max_tokens_within_forwards(params))

    def _check_forwards(self, params: SamplingParams) -> None:
        cost = self.max_decode_forwards(params)
        if cost <= self.max_forwards:
            return
        m, cap, block, steps = params.max_tokens, self.max_forwards, params.block_length, params.steps
        assert block is not None and (steps is not None or params.mode == "auto")
        over = f"over this server's max_forwards_per_request of {cap}"
        if params.mode not in ("ar", "diffusion") and params.threshold is not None:  # self_spec-style drafting
            one_shot = self.max_decode_forwards(dataclasses.replace(params, threshold=None))
            knob = "threshold" if one_shot <= cap else "max_tokens"
            cheaper = f"omit threshold (one draft forward per round: {one_shot}), or lower" if one_shot <= cap \
                else "lower"
            raise InvalidParam(
                knob,
                f"{knob} {getattr(params, knob)}: {params.mode} drafting by threshold takes up to {block - 1} draft "
                f"forwards (block_length {block}) and a verify per round, and a round may emit one token, so "
                f"max_tokens {m} may need {cost} decode forwards, {over}; {cheaper} block_length or max_tokens")
        if params.mode == "diffusion":
            one_step = self.max_decode_forwards(dataclasses.replace(params, steps=1))
            knob = "steps" if one_step <= cap else "max_tokens"
            fewer = f"steps (1 step: {one_step}) or " if knob == "steps" else ""
            raise InvalidParam(
                knob, f"{knob} {getattr(params, knob)}: diffusion takes up to {min(steps, block - 1)} denoise forwards "
                f"and a commit per block of {block}, so max_tokens {m} may need {cost} decode forwards, {over}; "
                f"lower {fewer}max_tokens")
        raise InvalidParam("max_tokens", f"max_tokens {m} may need {cost} decode forwards in {params.mode} mode, "
                                         f"{over}; lower max_tokens")
