"""trimode's engine: tri-mode model, paged KV cache, scheduler and decoders. Speaks token ids only.

`from engine import LLM, SamplingParams` is the offline API (vLLM's style); the names load lazily so that
importing `engine.config` or `engine.sequence` does not pull in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "SamplingParams", "EngineConfig"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from engine.sequence import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
