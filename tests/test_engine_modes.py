"""Conformance of the three decoders on a tiny random checkpoint: equalities against naive recompute."""

import random

import pytest
import torch

from engine.decoding.modes import DENOISE_STEPS_PER_BLOCK, MODES, SPEC_ACCEPTED_TOKENS, SPEC_DRAFT_TOKENS, SPEC_DRAFTS
from engine.forward import Forward
from engine.sequence import SamplingParams
from tests.checkpoints import MASK_ID
from tests.reference import ar_greedy, diffusion_greedy


def ragged_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 96) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def test_paged_ar_logits_equal_full_recompute(tiny_llm):
    """Every AR decode's logits from the paged cache equal a no-cache recompute of the whole sequence (fp32)."""
    eng = tiny_llm.engine
    seen: list[tuple[list[int], torch.Tensor]] = []
    run = eng.runner.run

    def spy(batch):
        out = run(batch)
        if batch.forward == Forward.AR_DECODE:
            for seq, rows in zip(batch.seqs, out):
                seen.append((list(seq.token_ids), rows[-1].clone()))
        return out

    eng.runner.run = spy
    try:
        tiny_llm.generate(ragged_prompts(4), SamplingParams(max_tokens=12, mode="ar", ignore_eos=True))
    finally:
        eng.runner.run = run
    assert len(seen) == 4 * 11
    model = eng.runner.model
    from tests.reference import _logits

    for ids, logits in seen:
        # tolerance: fp32, different summation order (gathered pages vs one dense matmul)
        torch.testing.assert_close(logits, _logits(model, ids, len(ids))[-1], atol=2e-4, rtol=1e-4)


def test_paged_logits_of_mixed_prefill_and_decode_batches_equal_full_recompute(tiny_ckpt):
    """Forwards holding one-token decodes next to prefill chunks (with and without cached context) give every
    sequence the logits of a no-cache recompute of its prefix (fp32)."""
    from engine.llm import LLM
    from tests.reference import _logits

    llm = LLM(model=str(tiny_ckpt), num_kv_tokens=4096, max_num_batched_tokens=24)  # long prompts get chunked
    eng = llm.engine
    seen: list[tuple[list[int], torch.Tensor]] = []
    mixed = 0
    run = eng.runner.run

    def spy(batch):
        nonlocal mixed
        out = run(batch)
        forwards = {r.forward for r in batch.requests}
        if {Forward.PREFILL, Forward.AR_DECODE} <= forwards:
            mixed += 1
            for seq, req, rows in zip(batch.seqs, batch.requests, out):
                seen.append((list(seq.token_ids[:seq.num_computed_tokens + len(req.token_ids)]), rows[-1].clone()))
        return out

    eng.runner.run = spy
    params = SamplingParams(max_tokens=8, mode="ar", ignore_eos=True)
    prompts = ragged_prompts(6, seed=5) + [[7] * 50]
    for i, p in enumerate(prompts[:3]):
        eng.add_request(f"x{i}", p, params)
    eng.step()
    for i, p in enumerate(prompts[3:], start=3):
        eng.add_request(f"x{i}", p, params)
    while eng.has_unfinished():
        eng.step()
    assert mixed >= 2 and eng.num_free_blocks == eng.num_total_blocks
    for ids, logits in seen:
        torch.testing.assert_close(logits, _logits(eng.runner.model, ids, len(ids))[-1], atol=2e-4, rtol=1e-4)


def test_greedy_ar_equals_naive_recompute(tiny_llm):
    prompts = ragged_prompts(3, seed=1)
    outs = tiny_llm.generate(prompts, SamplingParams(max_tokens=10, mode="ar", ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.token_ids == ar_greedy(tiny_llm.engine.runner.model, p, 10, MASK_ID)


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_self_spec_equals_greedy_ar(tiny_llm, batch):
    prompts = ragged_prompts(batch, seed=2)
    ar = tiny_llm.generate(prompts, SamplingParams(max_tokens=30, mode="ar", ignore_eos=True))
    spec = tiny_llm.generate(prompts, SamplingParams(max_tokens=30, mode="self_spec", ignore_eos=True))
    for a, s in zip(ar, spec):
        assert s.token_ids == a.token_ids
        assert s.finish_reason == a.finish_reason == "length"


@pytest.mark.parametrize("steps,threshold", [(8, 1.0), (2, 1.0), (4, 0.5), (8, 0.9)])
def test_greedy_diffusion_equals_reference_generate(tiny_llm, steps, threshold):
    prompts = ragged_prompts(3, seed=3)
    params = SamplingParams(max_tokens=20, mode="diffusion", steps=steps, threshold=threshold, ignore_eos=True)
    outs = tiny_llm.generate(prompts, params)
    model = tiny_llm.engine.runner.model
    for p, o in zip(prompts, outs):
        assert o.token_ids == diffusion_greedy(model, p, 20, 8, steps, threshold, MASK_ID)


@pytest.mark.parametrize("mode", MODES)
def test_alone_equals_inside_a_batch_of_8(tiny_llm, mode):
    prompts = ragged_prompts(8, seed=4)
    params = SamplingParams(max_tokens=17, mode=mode, ignore_eos=True, threshold=0.7 if mode == "diffusion" else None)
    together = tiny_llm.generate(prompts, params)
    for i in (0, 5):
        alone = tiny_llm.generate([prompts[i]], params)[0]
        assert alone.token_ids == together[i].token_ids


@pytest.mark.parametrize("mode", MODES)
def test_max_tokens_is_exact_and_mask_never_emitted(tiny_llm, mode):
    for m in (1, 2, 7, 9, 23):
        outs = tiny_llm.generate(ragged_prompts(3, seed=m), SamplingParams(max_tokens=m, mode=mode, ignore_eos=True))
        for o in outs:
            assert len(o.token_ids) == m and o.finish_reason == "length"
            assert MASK_ID not in o.token_ids


def test_diffusion_steps_equal_block_commits_one_token_per_denoise(tiny_llm):
    eng = tiny_llm.engine
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=16, mode="diffusion", steps=8, threshold=1.0,
                                                        ignore_eos=True))[0]
    # 16 tokens = seed + block of 8 (7 denoise steps, 1 commit) + block of 8 minus its seed (7 denoise), no commit
    assert out.num_decode_forwards == 7 + 1 + 7
    assert eng.last_stats.observations == {DENOISE_STEPS_PER_BLOCK: [7]}


def test_diffusion_steps_1_uses_one_denoise_forward_per_block(tiny_llm):
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(max_tokens=24, mode="diffusion", steps=1,
                                                        ignore_eos=True))[0]
    # blocks of 8: [seed + 7] [8] [8]: each one denoise forward; a commit between blocks
    assert len(out.token_ids) == 24
    assert out.num_decode_forwards == 3 + 2


def test_self_spec_counters_add_up_to_the_output(tiny_llm):
    """seed + per verify (accepted drafts + 1 bonus) == output tokens; acceptance counters as vLLM's."""
    eng = tiny_llm.engine
    eng.add_request("s", [9, 9, 9], SamplingParams(max_tokens=30, mode="self_spec", ignore_eos=True))
    drafts = accepted = draft_tokens = 0
    out = []
    while eng.has_unfinished():
        for o in eng.step():
            out += o.new_token_ids
        drafts += eng.last_stats.counters.get(SPEC_DRAFTS, 0)
        accepted += eng.last_stats.counters.get(SPEC_ACCEPTED_TOKENS, 0)
        draft_tokens += eng.last_stats.counters.get(SPEC_DRAFT_TOKENS, 0)
    assert len(out) == 30
    assert 1 + accepted + drafts >= 30  # the last verify may be cut by max_tokens
    assert accepted <= draft_tokens <= 7 * drafts


@pytest.mark.parametrize("mode", MODES)
def test_eos_ends_the_request_and_is_the_last_token(tiny_llm, mode):
    eng = tiny_llm.engine
    outs = tiny_llm.generate(ragged_prompts(6, seed=7), SamplingParams(max_tokens=40, mode=mode))
    for o in outs:
        if o.finish_reason == "stop":
            assert o.token_ids[-1] in eng.eos_token_ids
            assert not set(o.token_ids[:-1]) & set(eng.eos_token_ids)
        else:
            assert len(o.token_ids) == 40


@pytest.mark.parametrize("mode", MODES)
def test_stop_token_ids_end_the_request(tiny_llm, mode):
    base = tiny_llm.generate([[4, 5, 6]], SamplingParams(max_tokens=12, mode="ar", ignore_eos=True))[0]
    target = base.token_ids[5]
    params = SamplingParams(max_tokens=12, mode=mode, ignore_eos=True, stop_token_ids=(target,),
                            threshold=None if mode != "diffusion" else 1.0, steps=None)
    out = tiny_llm.generate([[4, 5, 6]], params)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == target and out.stop_reason == target
    assert target not in out.token_ids[:-1]


@pytest.mark.parametrize("mode", MODES)
def test_seeded_sampling_is_reproducible(tiny_llm, mode):
    params = SamplingParams(max_tokens=12, mode=mode, temperature=0.8, top_p=0.9, top_k=20, seed=1234,
                            ignore_eos=True)
    a = tiny_llm.generate(ragged_prompts(2, seed=8), params)
    b = tiny_llm.generate(ragged_prompts(2, seed=8), params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


@pytest.mark.parametrize("field,kwargs", [
    ("mode", {"mode": "beam"}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": 9, "block_length": 8}),
    ("threshold", {"threshold": 0.0}),
    ("threshold", {"threshold": 1.5}),
    ("max_tokens", {"max_tokens": 0}),
    ("top_p", {"top_p": 0.0}),
    ("temperature", {"temperature": -1.0}),
    ("logprobs", {"logprobs": 21}),
    ("logprobs", {"logprobs": -1}),
    ("prompt_logprobs", {"prompt_logprobs": 21}),
])
def test_bad_knobs_raise_value_error_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_logprobs_come_with_every_token_in_every_mode(tiny_llm, mode):
    prompts = ragged_prompts(3, seed=21)
    plain = tiny_llm.generate(prompts, SamplingParams(max_tokens=20, mode=mode, ignore_eos=True))
    outs = tiny_llm.generate(prompts, SamplingParams(max_tokens=20, mode=mode, ignore_eos=True, logprobs=3))
    for o, p in zip(outs, plain):
        assert o.token_ids == p.token_ids and p.logprobs is None  # asking for logprobs changes no token
        assert len(o.logprobs) == len(o.token_ids) == 20
        for tok, lp in zip(o.token_ids, o.logprobs):
            # greedy: every mode emits the argmax of the row it chose from, so the token is that row's top entry
            assert len(lp.top) == 3 and lp.top[0] == (tok, lp.logprob) and lp.logprob <= 0
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
            assert MASK_ID not in [t for t, _ in lp.top]


def test_ar_logprobs_equal_full_recompute_and_self_spec_reports_the_same(tiny_llm):
    from tests.reference import _logits

    prompts = ragged_prompts(2, seed=22)
    ar = tiny_llm.generate(prompts, SamplingParams(max_tokens=12, mode="ar", ignore_eos=True, logprobs=0))
    spec = tiny_llm.generate(prompts, SamplingParams(max_tokens=12, mode="self_spec", ignore_eos=True, logprobs=0))
    model = tiny_llm.engine.runner.model
    for prompt, a, s in zip(prompts, ar, spec):
        ids = prompt + a.token_ids
        logits = _logits(model, ids, len(ids))
        logits[:, MASK_ID] = float("-inf")
        want = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, torch.tensor(a.token_ids)[:, None])
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in a.logprobs]), want.squeeze(-1),
                                   atol=2e-4, rtol=1e-4)
        assert s.token_ids == a.token_ids and all(lp.top == () for lp in s.logprobs)
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in s.logprobs]),
                                   torch.tensor([lp.logprob for lp in a.logprobs]), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_prompt_logprobs_equal_full_recompute_across_prefill_chunks(tiny_ckpt, mode):
    from engine.llm import LLM
    from tests.reference import _logits

    llm = LLM(model=str(tiny_ckpt), num_kv_tokens=4096, max_num_batched_tokens=16)  # 40-token prompts: 3 chunks
    prompts = [[5 + (7 * i + j) % 80 for j in range(40)] for i in range(3)] + ragged_prompts(2, seed=23)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, mode=mode, ignore_eos=True, prompt_logprobs=2))
    model = llm.engine.runner.model
    for prompt, o in zip(prompts, outs):
        assert len(o.prompt_logprobs) == len(prompt) and o.prompt_logprobs[0] is None and o.logprobs is None
        if len(prompt) == 1:
            continue
        logits = _logits(model, prompt, len(prompt))
        logits[:, MASK_ID] = float("-inf")
        want = logits.log_softmax(-1)[:-1].gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1)
        got = torch.tensor([lp.logprob for lp in o.prompt_logprobs[1:]])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        assert all(len(lp.top) == 2 for lp in o.prompt_logprobs[1:])
    assert llm.engine.num_free_blocks == llm.engine.num_total_blocks


def test_disallowed_block_length_and_steps_past_default_block(tiny_llm):
    eng = tiny_llm.engine
    with pytest.raises(ValueError, match="block_length"):
        eng.policy.resolve_params(SamplingParams(mode="diffusion", block_length=7))
    with pytest.raises(ValueError, match="steps"):
        eng.policy.resolve_params(SamplingParams(mode="diffusion", steps=9))


def test_context_overflow_is_rejected_with_the_numbers(tiny_llm):
    eng = tiny_llm.engine
    with pytest.raises(ValueError, match="maximum context length is 512"):
        eng.add_request("x", [5] * 500, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.add_request("y", [5, 1000], SamplingParams(max_tokens=2))
    assert not eng.has_unfinished()


def test_abort_frees_blocks_at_once(tiny_llm):
    eng = tiny_llm.engine
    for i, mode in enumerate(MODES):
        eng.add_request(f"a{i}", [5] * 30, SamplingParams(max_tokens=50, mode=mode, ignore_eos=True))
    for _ in range(6):
        eng.step()
    assert eng.num_free_blocks < eng.num_total_blocks
    for i in range(len(MODES)):
        eng.abort_request(f"a{i}")
    assert eng.num_free_blocks == eng.num_total_blocks and not eng.has_unfinished()


def test_offline_api_is_importable_from_the_package(tiny_ckpt):
    from engine import LLM, SamplingParams

    out = LLM(model=str(tiny_ckpt), num_kv_tokens=1024).generate([[5, 6]], SamplingParams(max_tokens=3))[0]
    assert len(out.token_ids) == 3 and out.num_forwards >= 3
