"""Tensor parallelism over gloo (engine/parallel/): TP=2 equals one process, and a broken rank fails the engine.

Contracts: greedy outputs of a TP=2 engine equal the single-process engine's token for token in every mode, for
mixed (merged) batches too, and its logit rows are within FP32_TOL of them (the row-parallel sums add the ranks'
partial dot products in another order: 4.7e-7 relative here); a size that does not divide the heads is a ValueError
naming `tensor_parallel_size` before any process starts; a worker SIGKILLed in the middle of a forward fails
that forward with a TensorParallelError (never a batch error the engine would serve on), and nothing hangs.
One TP=2 engine is shared by the module (starting ranks costs seconds).
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from engine.config import MODES, EngineConfig
from engine.engine import BatchError, Engine
from engine.llm import LLM
from engine.parallel.group import TensorParallelError
from engine.parallel.shard import TensorShard
from engine.runner import ForwardPlan
from engine.sequence import SamplingParams
from tests.test_merged_forward import SPECS, _generate_in_waves, _params, _prompts

FP32_TOL = 1e-4  # max |logit difference| / max |logit|, TP=2 vs one process (measured 4.7e-7: 6e-6 of 12.6)


@pytest.fixture(scope="module")
def tp_llm(tiny_ckpt):
    """The TP=2 twin of the shared `tiny_llm` (same knobs)."""
    llm = LLM(model=str(tiny_ckpt), num_kv_tokens=8192, max_num_seqs=16, tensor_parallel_size=2)
    yield llm
    llm.engine.close()


@pytest.fixture
def tp(tp_llm):
    yield tp_llm
    eng = tp_llm.engine
    assert not eng.has_unfinished() and eng.num_free_blocks == eng.num_total_blocks


PROMPTS = [[5, 17, 33, 8, 41], [60, 12, 9], list(range(10, 40))]


@pytest.mark.parametrize("mode", MODES)
def test_tp2_greedy_equals_one_process_in_every_mode(tiny_llm, tp, mode: str) -> None:
    params = SamplingParams(max_tokens=16, temperature=0, mode=mode, ignore_eos=True)
    want = tiny_llm.generate(PROMPTS, params)
    got = tp.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    if mode != "auto":  # auto's choices follow each engine's measured forward costs; its tokens may not differ
        assert [o.num_decode_forwards for o in got] == [o.num_decode_forwards for o in want]


def test_tp2_mixed_batches_equal_one_process(tiny_llm, tp) -> None:
    """Every mode in the same forwards (draft-LoRA rows beside plain ones, requests joining mid-run)."""
    prompts = _prompts(len(SPECS), seed=17)
    params = [_params(spec, 12) for spec in SPECS]
    assert _generate_in_waves(tp, prompts, params) == _generate_in_waves(tiny_llm, prompts, params)


def test_tp2_logits_equal_one_process_within_fp32_tolerance(tiny_llm, tp) -> None:
    """One forward holding a draft-LoRA bidirectional block and a causal prefill, on free pages of both pools."""
    plan = ForwardPlan(input_ids=[7, 3, 3, 3, 11, 12, 13, 14, 15], q_lens=[4, 5], k_lens=[4, 5],
                       causal=[False, True], block_tables=[[0], [1]], lora_rows=4)
    rows = []
    for llm in (tiny_llm, tp):
        runner = llm.engine.runner
        with torch.inference_mode():
            hidden = runner._on_every_rank(plan)
            rows.append(runner.model.logits(hidden))
    one, two = rows
    assert one.shape == two.shape == (9, tiny_llm.engine.model_config.vocab_size)
    assert (one - two).abs().max() <= FP32_TOL * one.abs().max()
    assert torch.equal(one.argmax(-1), two.argmax(-1))


def test_each_rank_holds_its_share_of_the_heads_and_kv_pages(tiny_llm, tp) -> None:
    full, rank0 = tiny_llm.engine.runner, tp.engine.runner
    assert rank0.cache.k.shape[-2] * 2 == full.cache.k.shape[-2]  # half the KV heads ...
    assert rank0.num_kv_blocks == full.num_kv_blocks  # ... on the same page ids
    attn = rank0.model.encoder.layers[0].self_attn
    assert attn.num_heads * 2 == full.model.encoder.layers[0].self_attn.num_heads
    assert attn.o_proj.lora_A.shape[1] * 2 == full.model.encoder.layers[0].self_attn.o_proj.lora_A.shape[1]
    assert len(rank0.peers.pids) == 1


def test_a_size_that_does_not_divide_the_heads_is_a_config_error(tiny_ckpt) -> None:
    # the tiny checkpoint has 2 KV heads and 4 attention heads: 3 ranks cannot share them (no process starts)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide .*num_key_value_heads=2"):
        Engine(EngineConfig(model=str(tiny_ckpt), num_kv_tokens=1024, tensor_parallel_size=3))
    with pytest.raises(ValueError, match="tensor_parallel_size=0"):
        EngineConfig(tensor_parallel_size=0)
    from engine.model_config import ModelConfig
    from tests.checkpoints import nld_raw_config

    cfg = ModelConfig.from_dict(nld_raw_config(num_key_value_heads=4, num_attention_heads=4))
    with pytest.raises(ValueError, match="intermediate_size=128"):
        TensorShard(0, 3).rank_config(ModelConfig.from_dict({**nld_raw_config(), "num_key_value_heads": 3,
                                                              "num_attention_heads": 3, "intermediate_size": 128}))
    assert TensorShard(1, 4).rank_config(cfg).num_key_value_heads == 1


def test_a_worker_killed_mid_forward_fails_the_engine_without_a_hang(tiny_ckpt) -> None:
    """SIGKILL rank 1 from inside rank 0's first all-reduce of a forward (the worker is certainly in the forward,
    waiting for rank 0): the collective fails at once, the step raises TensorParallelError (not a BatchError),
    and the engine runs no forward after it."""
    eng = Engine(EngineConfig(model=str(tiny_ckpt), num_kv_tokens=1024, tensor_parallel_size=2))
    try:
        runner = eng.runner
        worker = runner.peers._procs[0]
        real = runner.group.all_reduce

        def kill_then_reduce(t: torch.Tensor) -> torch.Tensor:
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait()
            return real(t)

        runner.model.set_reduce(kill_then_reduce)
        eng.add_request("r", [5, 6, 7], SamplingParams(max_tokens=4, mode="ar"))
        with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited \(exit code -9\)") as err:
            eng.step()
        assert not isinstance(err.value, BatchError)
        with pytest.raises(TensorParallelError, match="rank 1"):
            eng.probe()
    finally:
        eng.close()


def test_a_worker_killed_while_idle_is_seen_at_once_and_fails_the_next_step(tiny_ckpt) -> None:
    """No forward running: the watch (what the engine process uses to exit) fires on the worker's death by itself,
    and the next step fails before sending the worker anything."""
    eng = Engine(EngineConfig(model=str(tiny_ckpt), num_kv_tokens=1024, tensor_parallel_size=2))
    try:
        peers = eng.runner.peers
        lost: list[str] = []
        seen = threading.Event()
        peers.watch(lambda reason: (lost.append(reason), seen.set()))
        os.kill(peers.pids[0], signal.SIGKILL)
        assert seen.wait(60), "the watch never fired"
        assert "rank 1" in lost[0] and "exit code -9" in lost[0]
        eng.add_request("r", [5, 6, 7], SamplingParams(max_tokens=4, mode="ar"))
        with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited \(exit code -9\)"):
            eng.step()
    finally:
        eng.close()


def test_memory_doc_per_rank_figures_match_the_sharded_model() -> None:
    """docs/memory.md's per-rank table: each rank's parameters counted on the engine's own sharded model (meta)."""
    import math
    from pathlib import Path

    from engine.model import TriModeModel
    from engine.model_config import ModelConfig
    from tests.checkpoints import nld_raw_config
    from tests.test_deploy import (
        GEOMETRY,
        GPUS,
        HEAD_DIM,
        HEADS,
        KV_BLOCK,
        KV_HEADS,
        LORA_RANK,
        RESERVE,
        UTILIZATION,
        VOCAB,
    )

    doc = (Path(__file__).parents[1] / "docs" / "memory.md").read_text()
    for size in ("8B", "14B"):
        hidden, inter, layers = GEOMETRY[size]
        cfg = ModelConfig.from_dict(nld_raw_config(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM))
        for n in (2, 4, 8):
            with torch.device("meta"):
                model = TriModeModel(TensorShard(0, n).rank_config(cfg))
            lora = layers * LORA_RANK * (HEADS * HEAD_DIM // n + hidden)  # A's column share, B whole
            rank0 = 2 * (sum(p.numel() for p in model.parameters()) + lora)
            rest = rank0 - 2 * VOCAB * hidden  # no LM head
            kv = 2 * layers * (KV_HEADS // n) * HEAD_DIM * 2
            tokens = math.floor((GPUS["80 GB"] * UTILIZATION - rank0 - RESERVE) / (kv * KV_BLOCK)) * KV_BLOCK
            row = next((ln for ln in doc.splitlines() if ln.startswith(f"| {size} | {n} |")), None)
            assert row is not None, f"docs/memory.md has no per-rank row for {size} at N = {n}"
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert cells == [size, str(n), f"{rank0:,} ({rank0 / 2**30:.2f} GiB)", f"{rest:,} ({rest / 2**30:.2f} GiB)",
                             f"{kv:,}", f"{tokens:,}"], row
