"""One forward carries every mode: merged forwards change no greedy output and (within fp32 rounding) no logit row,
and a mixed workload needs far fewer weight passes than its modes run one after another."""

import random

import pytest
import torch

from engine.batch import Batch
from engine.forward import Forward
from engine.llm import LLM
from engine.sequence import SamplingParams

# every mode, several block lengths and step budgets, threshold and schedule-only diffusion, threshold drafting
SPECS = [
    dict(mode="ar"),
    dict(mode="self_spec", block_length=4),
    dict(mode="self_spec", block_length=8),
    dict(mode="self_spec", block_length=16, threshold=0.6),  # drafts over several forwards
    dict(mode="diffusion", block_length=8, steps=8, threshold=1.0),
    dict(mode="diffusion", block_length=8, steps=2),
    dict(mode="diffusion", block_length=4, steps=4, threshold=0.7),
    dict(mode="diffusion", block_length=16, steps=4, threshold=0.8),
    dict(mode="ar"),
]
# (self_spec drafts, diffusion denoise steps) with the draft LoRA: per-row LoRA is exercised by (True, False)
LORA = [(True, False), (True, True), (False, False)]


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 96) for _ in range(rng.randrange(3, 30))] for _ in range(n)]


def _params(spec: dict, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **spec)


def _llm(path, spec_lora: bool, diffusion_lora: bool, **kw) -> LLM:
    kw = dict(num_kv_tokens=8192, max_num_seqs=16) | kw
    return LLM(model=str(path), draft_lora=spec_lora, diffusion_lora=diffusion_lora, **kw)


def _generate_in_waves(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Half the requests first, the rest three steps later (their prefills ride with the running decodes)."""
    eng = llm.engine
    outs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    half = len(prompts) // 2
    for i in range(half):
        eng.add_request(f"wave-{i}", prompts[i], params[i])
    step = 0
    while eng.has_unfinished() or step < 3:
        if step == 3:
            for i in range(half, len(prompts)):
                eng.add_request(f"wave-{i}", prompts[i], params[i])
        for o in eng.step():
            outs[int(o.request_id.split("-")[1])] += o.new_token_ids
        step += 1
    return [outs[i] for i in range(len(prompts))]


def _spy(llm: LLM, on_batch) -> None:
    run = llm.engine.runner.run

    def spy(batch: Batch):
        on_batch(batch)
        return run(batch)

    llm.engine.runner.run = spy


@pytest.mark.parametrize("spec_lora,diffusion_lora", LORA)
def test_every_mode_alone_equals_its_output_inside_forwards_holding_every_other_mode(tiny_ckpt, spec_lora,
                                                                                     diffusion_lora):
    llm = _llm(tiny_ckpt, spec_lora, diffusion_lora)
    prompts = _prompts(len(SPECS), seed=21)
    params = [_params(s, 26) for s in SPECS]
    alone = [llm.generate([p], [q])[0].token_ids for p, q in zip(prompts, params)]
    kinds_together: list[set[Forward]] = []
    lora_mixed = 0

    def watch(batch: Batch) -> None:
        nonlocal lora_mixed
        kinds_together.append({r.forward for r in batch.requests})
        bidir_lora = {r.key.draft_lora for r in batch.requests if not r.forward.causal}
        lora_mixed += bidir_lora == {True, False}

    _spy(llm, watch)
    merged = _generate_in_waves(llm, prompts, params)
    assert merged == alone
    # the forwards really were mixed: some carried four kinds at once, and every kind rode with another
    assert max(len(k) for k in kinds_together) >= 4
    for kind in Forward:
        assert any(kind in k and len(k) > 1 for k in kinds_together), kind
    # rows with and without the draft adapter shared forwards exactly when the two bidirectional kinds differ
    assert (lora_mixed > 0) == (spec_lora != diffusion_lora)
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_greedy_self_spec_inside_merged_forwards_still_equals_greedy_ar(tiny_llm):
    prompts = _prompts(4, seed=22)
    ar = tiny_llm.generate(prompts, _params(dict(mode="ar"), 30))
    mixed = [dict(mode="self_spec"), dict(mode="diffusion", steps=2), dict(mode="self_spec", block_length=4),
             dict(mode="ar")]
    outs = tiny_llm.generate(prompts + prompts, [_params(dict(mode="self_spec"), 30)] * 4
                             + [_params(s, 30) for s in mixed])
    for a, s in zip(ar, outs[:4]):
        assert s.token_ids == a.token_ids


@pytest.mark.parametrize("spec_lora,diffusion_lora", LORA[:1])
def test_logit_rows_of_a_merged_forward_equal_its_sections_run_as_separate_forwards(tiny_ckpt, spec_lora,
                                                                                     diffusion_lora):
    """Each section (the old rule's forward) run alone first, then the merged forward (whose K/V the cache keeps):
    every sequence's logit rows agree within fp32 rounding of GEMMs over a different number of rows."""
    llm = _llm(tiny_ckpt, spec_lora, diffusion_lora)
    runner = llm.engine.runner
    run = runner.run
    compared, worst = 0, 0.0

    def spy(batch: Batch):
        nonlocal compared, worst
        separate = {}
        if len(batch.sections) > 1:
            for sec in batch.sections:
                part = Batch(batch.seqs[sec.start:sec.end], batch.requests[sec.start:sec.end])
                for seq, rows in zip(part.seqs, run(part)):
                    separate[seq.request_id] = rows
        out = run(batch)
        for seq, rows in zip(batch.seqs, out):
            if seq.request_id in separate:
                # tolerance: fp32 logits of magnitude ~10; the GEMMs' blocking differs with the row count
                torch.testing.assert_close(rows, separate[seq.request_id], atol=1e-4, rtol=1e-5)
                worst = max(worst, float((rows - separate[seq.request_id]).abs().max()))
                compared += 1
        return out

    runner.run = spy
    prompts = _prompts(len(SPECS), seed=23)
    llm.generate(prompts, [_params(s, 20) for s in SPECS])
    assert compared > 100 and worst < 1e-4
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def _count_forwards(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> tuple[int, list[list[int]]]:
    eng = llm.engine
    rid = [f"w{i}" for i in range(len(prompts))]
    for r, p, q in zip(rid, prompts, params):
        eng.add_request(r, p, q)
    forwards, outs = 0, {r: [] for r in rid}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
        forwards += eng.last_stats.num_model_forwards
    assert eng.num_free_blocks == eng.num_total_blocks
    return forwards, [outs[r] for r in rid]


def test_a_1_1_1_mix_needs_at_most_0_6x_the_weight_passes_of_its_modes_run_alone(tiny_ckpt):
    """The benchmark's offline check, on the test checkpoint: 48 requests, 16 per mode, at concurrency 12 mixed
    against each mode's 16 at concurrency 4 (the same per-mode concurrency); counted in engine forwards."""
    modes = ["ar", "self_spec", "diffusion"]
    prompts = _prompts(48, seed=24)
    params = [_params(dict(mode=modes[i % 3]), 16) for i in range(48)]
    mixed, mixed_out = _count_forwards(_llm(tiny_ckpt, True, False, max_num_seqs=12), prompts, params)
    alone, alone_out = 0, [None] * 48
    for m in range(3):
        idx = list(range(m, 48, 3))
        n, outs = _count_forwards(_llm(tiny_ckpt, True, False, max_num_seqs=4), [prompts[i] for i in idx],
                                  [params[i] for i in idx])
        alone += n
        for i, o in zip(idx, outs):
            alone_out[i] = o
    assert mixed_out == alone_out
    assert mixed <= 0.6 * alone, (mixed, alone)
