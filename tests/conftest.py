import pytest

from engine.llm import LLM
from tests.checkpoints import write_nld_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tri-mode checkpoint with a draft LoRA (2 layers, vocab 96, block_size 8)."""
    return write_nld_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", lora_rank=4)


@pytest.fixture(scope="session")
def _tiny_llm(tiny_ckpt):
    return LLM(model=str(tiny_ckpt), num_kv_tokens=8192, max_num_seqs=16)


@pytest.fixture
def tiny_llm(_tiny_llm):
    """The shared tiny LLM; after each test every KV block must be free again."""
    yield _tiny_llm
    eng = _tiny_llm.engine
    assert not eng.has_unfinished()
    assert eng.num_free_blocks == eng.num_total_blocks
