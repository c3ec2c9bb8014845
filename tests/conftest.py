import pytest
import torch

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
    """The shared tiny LLM (prefix caching on, as by default); after each test every KV block must be free again
    and every count exact, and its prefix cache is emptied so that each test starts cold."""
    yield _tiny_llm
    assert_kv_idle(_tiny_llm.engine)
    _tiny_llm.engine.reset_prefix_cache()


def assert_kv_idle(eng) -> None:
    """No work left and the KV pool exact: every block free (cached ones included), references and hashes
    consistent (BlockManager.check_invariants)."""
    assert not eng.has_unfinished()
    assert eng.num_free_blocks == eng.num_total_blocks
    eng.check_kv_invariants()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of many tiny forwards: on a small shared CPU box a second OpenMP thread only
    costs. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
