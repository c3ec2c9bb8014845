"""Tiny random-weight checkpoints in Hugging Face layout, written by the tests themselves."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.loader import save_checkpoint, save_draft_lora
from engine.model import TriModeModel
from engine.model_config import ModelConfig

VOCAB = 96
MASK_ID = 3
EOS_ID = 2


def nld_raw_config(**over) -> dict:
    raw = {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,  # heads * head_dim != hidden, as in the 3B and 14B
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": EOS_ID,
        "mask_token_id": MASK_ID,
        "block_size": 8,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
        },
        "torch_dtype": "float32",
    }
    raw.update(over)
    return raw


def write_nld_checkpoint(path: Path, seed: int = 0, lora_rank: int = 0, **over) -> Path:
    """A random NLD checkpoint; logits are sharpened so greedy decoding is not a coin toss between ties."""
    raw = nld_raw_config(**over)
    torch.manual_seed(seed)
    model = TriModeModel(ModelConfig.from_dict(raw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        model.diffusion_head.weight.mul_(6.0)
        if lora_rank:
            for layer in model.encoder.layers:
                o = layer.self_attn.o_proj
                o.set_lora(torch.randn(lora_rank, o.in_features) * 0.1, torch.randn(o.out_features, lora_rank) * 0.1,
                           2.0)
    save_checkpoint(model, path, raw, dtype=torch.float32)
    if lora_rank:
        save_draft_lora(model, path, lora_rank, 2.0 * lora_rank, dtype=torch.float32)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID]}))
    return path
