"""The model's geometry, read from a Hugging Face `config.json`.

One dataclass covers Nemotron-Labs-Diffusion (`model_type == "nemotron_labs_diffusion"`, tri-mode) and plain
Llama/Mistral-family causal LMs (AR only). Unknown keys in `config.json` are ignored (they belong to Hugging Face);
missing required keys are errors that name the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TRIMODE_MODEL_TYPES = ("nemotron_labs_diffusion",)
AR_MODEL_TYPES = ("llama", "mistral", "ministral", "ministral3", "qwen2")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    rope_type: str = "default"  # "default" or "yarn"
    theta: float = 10000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    llama_4_scaling_beta: float | None = None  # Llama-4 query scale past original_max_position_embeddings


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig = field(default_factory=RopeConfig)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    mask_token_id: int | None = None  # tri-mode checkpoints only
    block_size: int = 32  # the diffusion block length the checkpoint was trained with
    diffusion_lora_hint: bool = False  # `trimode_diffusion_lora`: the draft LoRA was trained for denoising too

    @property
    def is_trimode(self) -> bool:
        """True when the checkpoint decodes in all three modes; plain causal LMs serve `ar` only."""
        return self.model_type in TRIMODE_MODEL_TYPES

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token across all layers, at 2 bytes per element (bf16)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 2

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        def need(key: str):
            if key not in raw or raw[key] is None:
                raise ValueError(f"config.json: missing required key '{key}'")
            return raw[key]

        model_type = str(need("model_type"))
        if model_type not in TRIMODE_MODEL_TYPES + AR_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type '{model_type}' is not supported "
                f"(supported: {', '.join(TRIMODE_MODEL_TYPES + AR_MODEL_TYPES)})"
            )
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ValueError("config.json: attention_bias / mlp_bias are not supported")
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = raw.get("head_dim") or hidden // heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        mask_id = raw.get("mask_token_id")
        if model_type in TRIMODE_MODEL_TYPES and (mask_id is None or int(mask_id) < 0):
            raise ValueError("config.json: a tri-mode checkpoint needs a non-negative 'mask_token_id'")
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope=_rope_from_dict(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            mask_token_id=None if mask_id is None else int(mask_id),
            block_size=int(raw.get("block_size", 32)),
            diffusion_lora_hint=bool(raw.get("trimode_diffusion_lora", False)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        return cls.from_dict(json.loads(path.read_text()))


def _rope_from_dict(raw: dict) -> RopeConfig:
    # transformers 5 writes `rope_parameters`; older files use `rope_scaling` + `rope_theta`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ValueError(f"config.json: rope_type '{rope_type}' is not supported (default, yarn)")
    orig = params.get("original_max_position_embeddings")
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=None if params.get("factor") is None else float(params["factor"]),
        original_max_position_embeddings=None if orig is None else int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        llama_4_scaling_beta=params.get("llama_4_scaling_beta"),
    )
