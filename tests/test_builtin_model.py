"""The shipped `engine/builtin/trimode-tiny`: loads, and reproduces the cheap figures of its model card.

`figures.json` next to the weights holds what `python -m training.evaluate` measured; its `quick` block is the
subset recomputed here (4 held-out prompts, 64 greedy tokens, 32 validation windows). Tolerances: 2% on the
validation perplexity, 10% on tokens per forward / accepted tokens (kernel numerics can flip a near-tie argmax
on another CPU). Greedy self_spec must equal greedy AR token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BUILTIN = Path(__file__).resolve().parents[1] / "engine" / "builtin" / "trimode-tiny"

pytestmark = pytest.mark.skipif(not (BUILTIN / "figures.json").exists(), reason="built-in model not shipped")


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from engine.loader import load_model
    from training.corpus import build
    from training.evaluate import load_prompts, quick
    from training.train import encode_split

    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = tmp_path_factory.mktemp("corpus")
    build(data)  # deterministic: the same held-out split and prompts as at training time
    model, _ = load_model(BUILTIN, dtype=torch.float32, load_lora=False)
    val = encode_split(BUILTIN, "val", data_dir=data)
    return quick(BUILTIN, model, val, load_prompts(data / "prompts.jsonl"))


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((BUILTIN / "figures.json").read_text())


def test_shipped_files() -> None:
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", "README.md"):
        assert (BUILTIN / f).is_file(), f
    cfg = json.loads((BUILTIN / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_labs_diffusion" and cfg["max_position_embeddings"] >= 2048
    size = sum(p.stat().st_size for p in BUILTIN.rglob("*") if p.is_file())
    assert size < 40 * 2**20


def test_tokenizer_offline() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BUILTIN), local_files_only=True)
    cfg = json.loads((BUILTIN / "config.json").read_text())
    assert tok.convert_tokens_to_ids("<|mask|>") == cfg["mask_token_id"]
    assert tok.eos_token_id in cfg["eos_token_id"]
    text = tok.apply_chat_template([{"role": "user", "content": "Who's there?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|im_start|>user\nWho's there?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode("Thou art a villain.\n")) == "Thou art a villain.\n"


def test_greedy_self_spec_equals_ar(measured: dict) -> None:
    assert measured["spec_equals_ar"]


def test_card_figures(measured: dict, card: dict) -> None:
    q = card["quick"]
    assert measured["val_ppl_32"] == pytest.approx(q["val_ppl_32"], rel=0.02)
    assert measured["self_spec_accepted"] == pytest.approx(q["self_spec_accepted"], rel=0.10)
    assert measured["diffusion_tpf_0.9"] == pytest.approx(q["diffusion_tpf_0.9"], rel=0.10)
