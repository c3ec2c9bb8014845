"""trimode's model equals transformers' own Ministral3ForCausalLM on the same weights (YaRN, Llama-4 scale)."""

import pytest
import torch
from transformers import Ministral3Config, Ministral3ForCausalLM

from engine.attention import DenseContext
from engine.cpu_linear import prepare_cpu_linears
from engine.loader import load_model, save_checkpoint
from engine.model_config import ModelConfig
from tests.checkpoints import nld_raw_config, write_nld_checkpoint


def _hf_twin(raw: dict, model) -> Ministral3ForCausalLM:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
            "tie_word_embeddings")
    hf = Ministral3ForCausalLM(Ministral3Config(**{k: raw[k] for k in keys}, sliding_window=None))
    state = {}
    for k, v in model.state_dict().items():
        state[k.replace("encoder.", "model.").replace("diffusion_head", "lm_head")] = v
    hf.load_state_dict(state, strict=True)
    return hf.eval()


@pytest.mark.parametrize("layout", ["plain", "fused", "packed"])
def test_yarn_and_query_scale_logits_equal_transformers(tmp_path, layout):
    """Also with the serving runner's layouts: q/k/v and gate/up fused, then (CPU) column-major layers and the LM
    head oneDNN-packed."""
    raw = nld_raw_config()
    model, _ = load_model(write_nld_checkpoint(tmp_path / "ckpt"))
    hf = _hf_twin(raw, model)
    if layout != "plain":
        model.fuse_projections()
        attn, mlp = model.encoder.layers[0].self_attn, model.encoder.layers[0].mlp
        assert attn.q_proj is None and attn.qkv_proj is not None and mlp.gate_up_proj is not None
        with pytest.raises(ValueError, match="fused"):
            save_checkpoint(model, tmp_path / "out", raw)
    if layout == "packed":
        assert prepare_cpu_linears(model, model.diffusion_head, torch.float32).endswith("onednn-packed (head)")
        assert model.diffusion_head.weight is None and model.diffusion_head.packed is not None
    # 80 tokens: positions run past original_max_position_embeddings (32) and 64, so the Llama-4 scale is > 1
    ids = torch.randint(4, raw["vocab_size"], (80,))
    with torch.no_grad():
        ours = model.logits(model(ids, torch.arange(80), DenseContext([0, 80], causal=True)))
        theirs = hf(ids[None]).logits[0].float()
    # fp32 on both sides; differences are summation order only
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_released_8b_config_parses():
    raw = nld_raw_config(hidden_size=4096, intermediate_size=14336, num_hidden_layers=34, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=131072, max_position_embeddings=262144,
                         eos_token_id=11, mask_token_id=100, block_size=32)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.kv_bytes_per_token == 136 * 1024
