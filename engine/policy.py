"""RequestPolicy: what a request may ask of one loaded engine, checked without touching the model.

A small frozen value (picklable), so the server can validate requests in its own process when the engine runs in
another: the engine process builds it after loading and ships it over. `Engine` delegates to it too, so both sides
give the same answer and the same `ValueError` text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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

    def resolve_params(self, params: SamplingParams) -> SamplingParams:
        """Fill the mode knobs' defaults and check them against this engine; ValueError names the field."""
        mode = params.mode or (self.default_mode if self.is_trimode else "ar")
        if mode != "ar" and not self.is_trimode:
            raise ValueError(f"mode '{mode}' needs a tri-mode checkpoint; {self.model_name} serves only 'ar'")
        block = params.block_length or self.default_block_length
        if block not in self.allowed_block_lengths:
            raise ValueError(f"block_length must be one of {list(self.allowed_block_lengths)}, got {block}")
        steps = params.steps or block
        if steps > block:
            raise ValueError(f"steps must be <= block_length ({block}), got {steps}")
        threshold = params.threshold
        if mode == "diffusion" and threshold is None:
            threshold = self.default_threshold
        return dataclasses.replace(params, mode=mode, block_length=block, steps=steps, threshold=threshold)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reject what can never run: empty or out-of-vocabulary prompts, and context overflow."""
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        vocab = self.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt contains token id {bad!r} outside the vocabulary [0, {vocab})")
        n, m = len(prompt_token_ids), params.max_tokens
        assert params.block_length is not None
        # diffusion denoises whole blocks, so it needs room for the last block in full
        need = -(-m // params.block_length) * params.block_length if params.mode == "diffusion" else m
        if n + need > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{m} output tokens and your prompt contains {n} input tokens, for a total of {n + need} tokens"
                f"{' (whole diffusion blocks)' if need != m else ''}. Please reduce the length of the input "
                f"prompt or the number of requested output tokens. (parameter=input_tokens, value={n})")
