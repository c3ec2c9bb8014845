"""Real weights: trimode's greedy AR output equals transformers' greedy `generate` on SmolLM2-135M-Instruct (fp32)."""

import pytest
import torch

from engine.llm import LLM
from engine.sequence import SamplingParams
from tests.smollm import smollm2_or_skip

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter who",
    "Q: What is the boiling point of water in Celsius?\nA:",
]
MAX_TOKENS = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smollm2_dir():
    return smollm2_or_skip()


@pytest.fixture(scope="module")
def smollm2_llm(smollm2_dir):
    return LLM(model=str(smollm2_dir), dtype="float32", device="cpu", num_kv_tokens=4096)


def test_greedy_ar_equals_transformers_generate_for_ragged_prompts(smollm2_dir, smollm2_llm):
    from transformers import AutoModelForCausalLM

    tok = smollm2_llm.tokenizer
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) > 3  # ragged
    ours = smollm2_llm.generate(prompt_ids, SamplingParams(max_tokens=MAX_TOKENS, mode="ar"))
    eng = smollm2_llm.engine
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    for ids, out in zip(prompt_ids, ours):
        with torch.inference_mode():  # one prompt at a time, unpadded
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=MAX_TOKENS, pad_token_id=tok.pad_token_id)
        assert out.token_ids == ref[0, len(ids):].tolist(), tok.decode(ids)
        assert out.finish_reason == ("stop" if out.token_ids[-1] in eng.eos_token_ids else "length")
    assert eng.num_free_blocks == eng.num_total_blocks


@pytest.mark.parametrize("mode", ["diffusion", "self_spec"])
def test_plain_checkpoint_rejects_tri_modes(smollm2_llm, mode):
    with pytest.raises(ValueError, match="tri-mode"):
        smollm2_llm.generate(["Hi"], SamplingParams(max_tokens=4, mode=mode))
    assert not smollm2_llm.engine.has_unfinished()


def test_tensor_parallel_greedy_equals_one_process(smollm2_dir, smollm2_llm):
    """Real weights over 3 gloo ranks (SmolLM2 has 3 KV heads and 9 attention heads: 3 ranks divide both, 2 do
    not and are refused before any process starts): the same greedy tokens as one process."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    with pytest.raises(ValueError, match="tensor_parallel_size=2 does not divide .*num_key_value_heads=3"):
        Engine(EngineConfig(model=str(smollm2_dir), device="cpu", num_kv_tokens=2048, tensor_parallel_size=2))
    tp = LLM(model=str(smollm2_dir), dtype="float32", device="cpu", num_kv_tokens=2048, tensor_parallel_size=3)
    try:
        params = SamplingParams(max_tokens=8, mode="ar")
        prompts = PROMPTS[:3]
        assert [o.token_ids for o in tp.generate(prompts, params)] == \
            [o.token_ids for o in smollm2_llm.generate(prompts, params)]
    finally:
        tp.engine.close()
