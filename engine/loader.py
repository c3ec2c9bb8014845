"""Load a checkpoint from a local directory in Hugging Face layout. Never touches the network.

Accepts `config.json` plus `model.safetensors` or a sharded `model.safetensors.index.json`; NLD names
(`encoder.*`, `diffusion_head.weight`) load as they are, plain causal LMs map `model.*` -> `encoder.*` and
`lm_head` -> `diffusion_head` (or tie it to the embeddings). The optional draft LoRA lives in
`linear_spec_lora/` (PEFT layout, o_proj only). A missing file is an error that names it. With a `TensorShard`
(tensor parallelism) each rank reads only its slice of every tensor (safetensors slices: the rest stays on disk).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.model import TriModeModel, rope_inv_freq
from engine.model_config import ModelConfig
from engine.parallel.shard import HEAD, TensorShard

LORA_DIR = "linear_spec_lora"


@dataclass
class CheckpointInfo:
    path: Path
    config: ModelConfig
    stop_token_ids: tuple[int, ...]  # from generation_config.json / config.json / the tokenizer
    has_draft_lora: bool


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def read_state_dict(path: Path, take: Callable[[str, Any], torch.Tensor | None] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by its file name; with `take(name, slice)`, what it returns for each (its
    part of the tensor, read from the safetensors slice, or None to skip it)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = [_require(path / s) for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = [_require(path / "model.safetensors")]
    if take is None:
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        return state
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                part = take(name, f.get_slice(name))
                if part is not None:
                    state[name] = part
    return state


def _map_name(name: str) -> str | None:
    if name.startswith("model."):
        return "encoder." + name[len("model."):]
    if name == "lm_head.weight":
        return "diffusion_head.weight"
    if name.startswith(("encoder.", "diffusion_head.")):
        return name
    return None


def stop_ids_for(path: Path, cfg: ModelConfig) -> tuple[int, ...]:
    ids: list[int] = list(cfg.eos_token_ids)
    gen = path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else ([] if eos is None else [eos])
    return tuple(dict.fromkeys(int(i) for i in ids))


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               load_lora: bool = True, shard: TensorShard | None = None) -> tuple[TriModeModel, CheckpointInfo]:
    """Build the model on `device` in `dtype` from the checkpoint directory `path`; with a `shard`, only that
    rank's part of it (its share of the heads; the LM head on rank 0 only: elsewhere `diffusion_head` is None).
    The CheckpointInfo always describes the whole model."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg = ModelConfig.from_file(_require(path / "config.json"))
    take = None
    if shard is not None:
        def take(name: str, tensor: Any) -> torch.Tensor | None:
            new = _map_name(name)
            return None if new is None else shard.take(cfg, new, tensor)
    state = read_state_dict(path, take)
    with torch.device("meta"):
        model = TriModeModel(cfg if shard is None else shard.rank_config(cfg))
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        new = _map_name(name)
        if new is not None:
            mapped[new] = tensor
    holds_head = shard is None or shard.holds_head
    if holds_head and (cfg.tie_word_embeddings or "diffusion_head.weight" not in mapped):
        if "diffusion_head.weight" not in mapped and not cfg.tie_word_embeddings:
            raise ValueError(f"{path}: no diffusion_head.weight / lm_head.weight and embeddings are not tied")
        mapped.pop("diffusion_head.weight", None)
    if not holds_head:
        mapped.pop(HEAD, None)
        model.diffusion_head = None  # type: ignore[assignment]  # a rank > 0 never computes logits
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == HEAD)}
    missing = sorted(expected - mapped.keys())
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.load_state_dict(mapped, strict=False, assign=True)
    if cfg.tie_word_embeddings and holds_head:
        model.diffusion_head.weight = model.encoder.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)[0]  # created on `meta` with the rest
    has_lora = load_lora and cfg.is_trimode and (path / LORA_DIR).is_dir()
    if has_lora:
        load_draft_lora(model, path / LORA_DIR, None if shard is None else (shard, cfg))
    model = model.to(device=device, dtype=dtype).eval()
    # the rope buffer stays fp32 whatever the weights' dtype
    model.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)[0].to(device)
    model.requires_grad_(False)
    return model, CheckpointInfo(path, cfg, stop_ids_for(path, cfg), has_lora)


def load_draft_lora(model: TriModeModel, lora_dir: Path, shard: tuple[TensorShard, ModelConfig] | None = None) -> None:
    """Attach the PEFT o_proj adapter: `y = o_proj(x) + (alpha / r) * B(A(x))`, used in draft forwards only; with
    a shard (and the whole model's config), A split with o_proj's input columns."""
    conf = json.loads(_require(lora_dir / "adapter_config.json").read_text())
    r, alpha = int(conf["r"]), float(conf["lora_alpha"])
    targets = conf.get("target_modules") or ["o_proj"]
    if set(targets) - {"o_proj"}:
        raise ValueError(f"{lora_dir}: only o_proj adapters are supported, got {targets}")
    weights = load_file(str(_require(lora_dir / "adapter_model.safetensors")))
    for i, layer in enumerate(model.encoder.layers):
        stem = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        a, b = weights.get(f"{stem}.lora_A.weight"), weights.get(f"{stem}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{lora_dir}: adapter lacks {stem}.lora_A/B")
        if shard is not None:
            a, b = shard[0].take_lora(shard[1], a, b)
        layer.self_attn.o_proj.set_lora(a, b, alpha / r)


def save_checkpoint(model: TriModeModel, path: str | os.PathLike, raw_config: dict,
                    dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `config.json` and `model.safetensors` with the released NLD names (used by training and tests)."""
    from safetensors.torch import save_file

    if any(layer.self_attn.qkv_proj is not None or layer.mlp.gate_up_proj is not None
           for layer in model.encoder.layers):
        raise ValueError("save_checkpoint: the model's projections are fused (an inference layout), not the "
                         "checkpoint's names")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if "lora_" not in k}
    if model.cfg.tie_word_embeddings:
        state.pop("diffusion_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")


def save_draft_lora(model: TriModeModel, path: str | os.PathLike, r: int, alpha: float,
                    dtype: torch.dtype = torch.bfloat16) -> None:
    """Write `linear_spec_lora/` in PEFT layout from the model's o_proj adapters."""
    from safetensors.torch import save_file

    lora_dir = Path(path) / LORA_DIR
    lora_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for i, layer in enumerate(model.encoder.layers):
        o = layer.self_attn.o_proj
        assert o.lora_A is not None and o.lora_B is not None, "model has no draft LoRA"
        stem = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        state[f"{stem}.lora_A.weight"] = o.lora_A.detach().to(dtype).contiguous()
        state[f"{stem}.lora_B.weight"] = o.lora_B.detach().to(dtype).contiguous()
    save_file(state, str(lora_dir / "adapter_model.safetensors"))
    conf = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["o_proj"], "bias": "none",
            "lora_dropout": 0.0, "task_type": None}
    (lora_dir / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
