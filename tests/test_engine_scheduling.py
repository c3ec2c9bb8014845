"""Scheduler and KV cache under pressure: one forward per step for every kind, the token budget, preemption, chunked
prefill, random add / abort / step interleavings over mixed modes, block lengths and step budgets."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.decoding.modes import MODES
from engine.llm import LLM
from engine.sequence import SamplingParams
from tests.engine_faults import step_with_a_failing_forward


def _params(mode: str, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, mode=mode, ignore_eos=True, threshold=0.8 if mode == "diffusion"
                          else None)


def _mixed_params(x: int) -> SamplingParams:
    """A request drawn from `x`: any mode, block length 4 or 8, diffusion step budgets 2 / 4 / whole block and
    thresholds or not, self_spec one-shot or threshold drafting, 10-16 tokens."""
    mode = MODES[x % 3]
    if mode == "ar":
        return _params(mode, 10 + x % 7)
    block = (4, 8)[x // 3 % 2]
    if mode == "self_spec":
        return SamplingParams(max_tokens=10 + x % 7, mode=mode, ignore_eos=True, block_length=block,
                              threshold=(None, 0.7)[x // 6 % 2])
    return SamplingParams(max_tokens=10 + x % 7, mode=mode, ignore_eos=True, block_length=block,
                          steps=min(block, (2, 4, 8)[x // 6 % 3]), threshold=(0.8, 1.0)[x // 18 % 2])


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 96) for _ in range(rng.randrange(5, 30))] for _ in range(n)]


def _drain(llm: LLM) -> None:
    eng = llm.engine
    while eng.has_unfinished():
        eng.step()
    assert eng.num_free_blocks == eng.num_total_blocks


def test_preemption_by_recompute_keeps_greedy_outputs(tiny_llm, tiny_ckpt):
    prompts = _prompts(6, seed=11)
    params = [_params(MODES[i % 3], 40) for i in range(6)]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, params)]
    # 8 pages of 16 tokens: six requests of up to ~70 tokens cannot all fit, so some are preempted
    small = LLM(model=str(tiny_ckpt), num_kv_tokens=128, max_model_len=128)
    got = [o.token_ids for o in small.generate(prompts, params)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == expected
    _drain(small)


def test_preemption_keeps_prompt_logprobs(tiny_llm, tiny_ckpt):
    prompts = _prompts(6, seed=15)
    params = [SamplingParams(max_tokens=40, mode=MODES[i % 3], ignore_eos=True, prompt_logprobs=1,
                             threshold=0.8 if i % 3 == 1 else None) for i in range(6)]
    expected = tiny_llm.generate(prompts, params)
    small = LLM(model=str(tiny_ckpt), num_kv_tokens=128, max_model_len=128)
    got = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    for e, g in zip(expected, got):
        assert g.token_ids == e.token_ids and len(g.prompt_logprobs) == len(e.prompt_logprobs)
        for a, b in zip(e.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            assert abs(a.logprob - b.logprob) < 2e-4 and a.top[0][0] == b.top[0][0]
    _drain(small)


def test_chunked_prefill_keeps_greedy_outputs(tiny_llm, tiny_ckpt):
    prompts = _prompts(4, seed=12)
    params = [_params(MODES[i % 3], 12) for i in range(4)]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, params)]
    chunked = LLM(model=str(tiny_ckpt), num_kv_tokens=4096, max_num_batched_tokens=8)
    assert [o.token_ids for o in chunked.generate(prompts, params)] == expected


def test_one_forward_per_step_carries_every_running_sequence_whatever_its_kind(tiny_llm):
    eng = tiny_llm.engine
    kinds: set[str] = set()
    widest = 0
    for i, p in enumerate(_prompts(9, seed=13)):
        eng.add_request(f"g{i}", p, _params(MODES[i % 3], 20))
    while eng.has_unfinished():
        finished = sum(o.finished for o in eng.step())
        stats = eng.last_stats
        assert stats.num_model_forwards == 1  # never a step without a forward while work is admitted
        # every running sequence rode in the step's one forward (the budget is far from binding here)
        assert stats.batch_size == sum(stats.seqs_by_forward.values()) == eng.num_running + finished
        assert stats.num_query_tokens == sum(stats.rows_by_forward.values())
        kinds |= {str(k) for k in stats.seqs_by_forward}
        widest = max(widest, len(stats.seqs_by_forward))
    assert kinds == {"prefill", "ar_decode", "denoise", "commit", "draft", "verify"}
    assert widest >= 3  # ar decodes, drafts or verifies, and denoise or commit steps side by side


def test_the_token_budget_caps_each_forward_decode_rows_go_first_and_no_sequence_starves(tiny_llm, tiny_ckpt):
    """A 20-token budget against blocks of 8: rows take turns, oldest first; prefill chunks fill the room left;
    nobody waits more than the rule allows and every greedy output equals an unconstrained run."""
    prompts = _prompts(7, seed=16) + [[9] * 45]
    params = [_params(MODES[i % 3], 14) for i in range(8)]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, params)]
    llm = LLM(model=str(tiny_ckpt), num_kv_tokens=4096, max_num_batched_tokens=20)
    eng = llm.engine
    outs: dict[str, list[int]] = {}
    for i, (p, q) in enumerate(zip(prompts, params)):
        eng.add_request(f"b{i}", p, q)
        outs[f"b{i}"] = []
    step = 0
    while eng.has_unfinished():
        step += 1
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
        stats = eng.last_stats
        assert stats.num_query_tokens <= 20
        assert stats.batch_size == sum(stats.seqs_by_forward.values())
        # a sequence left out is the oldest next step: with at least two 8-token blocks per forward, eight
        # sequences each run at least once every four steps
        for seq in eng.scheduler.running:
            assert step - seq.last_scheduled <= 4, (seq.request_id, step, seq.last_scheduled)
    assert [outs[f"b{i}"] for i in range(8)] == expected
    _drain(llm)


def test_new_requests_prefill_in_the_same_forward_as_running_decodes(tiny_llm):
    eng = tiny_llm.engine
    prompts = _prompts(5, seed=14)
    params = [_params("ar", 12)] * 3 + [_params("ar", 12), _params("self_spec", 12)]
    alone = [tiny_llm.generate([p], [q])[0].token_ids for p, q in zip(prompts, params)]
    eng.reset_prefix_cache()  # else the prompts' cached blocks would shorten the prefills counted below
    got: dict[str, list[int]] = {}
    for i in range(3):
        eng.add_request(f"m{i}", prompts[i], params[i])
    for out in eng.step():  # their prefill (one forward)
        got.setdefault(out.request_id, []).extend(out.new_token_ids)
    for i in (3, 4):
        eng.add_request(f"m{i}", prompts[i], params[i])
    for out in eng.step():
        got.setdefault(out.request_id, []).extend(out.new_token_ids)
    # three one-token decodes and two whole prompts in one causal forward, named after the decode group
    assert eng.last_stats.forward_kind == "ar_decode" and eng.last_stats.batch_size == 5
    assert eng.last_stats.num_query_tokens == 3 + len(prompts[3]) + len(prompts[4])
    while eng.has_unfinished():
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert [got[f"m{i}"] for i in range(5)] == alone
    assert eng.num_free_blocks == eng.num_total_blocks


_REFERENCE: dict[tuple, list[int]] = {}


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "abort", "step", "step", "step"]),
                              st.integers(0, 10_000)), min_size=5, max_size=40))
def test_random_add_abort_step_never_leaks_and_survivors_are_unchanged(tiny_ckpt, ops):
    llm = _pressure_llm(tiny_ckpt)
    eng = llm.engine
    rng_prompts = _prompts(8, seed=14)
    live: dict[str, int] = {}
    outs: dict[str, list[int]] = {}
    done: dict[str, list[int]] = {}
    n = 0
    for op, x in ops:
        if op == "add":
            rid = f"r{n}"
            n += 1
            live[rid] = x
            outs[rid] = []
            eng.add_request(rid, rng_prompts[x % len(rng_prompts)], _mixed_params(x))
        elif op == "abort" and live:
            rid = sorted(live)[x % len(live)]
            eng.abort_request(rid)
            live.pop(rid)
        else:
            for o in eng.step():
                outs[o.request_id] += o.new_token_ids
                if o.finished:
                    done[o.request_id] = outs[o.request_id]
                    live.pop(o.request_id, None)
            assert eng.last_stats.num_model_forwards <= 1
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
            if o.finished:
                done[o.request_id] = outs[o.request_id]
                live.pop(o.request_id, None)
    assert eng.num_free_blocks == eng.num_total_blocks
    assert not live
    # survivors' greedy outputs equal an unconstrained run of the same request alone
    for rid, toks in done.items():
        x = _x_of(rid, ops)
        key = (x % len(rng_prompts), _mixed_params(x))
        if key not in _REFERENCE:
            _REFERENCE[key] = _reference_llm(tiny_ckpt).generate([rng_prompts[key[0]]], key[1])[0].token_ids
        assert toks == _REFERENCE[key]


def _x_of(rid: str, ops) -> int:
    n = 0
    for op, x in ops:
        if op == "add":
            if f"r{n}" == rid:
                return x
            n += 1
    raise AssertionError(rid)


_LLMS: dict[str, LLM] = {}


def _pressure_llm(path) -> LLM:
    # one engine reused across examples (every example drains it): 6 pages of 16 tokens force preemption; its
    # self_spec drafts use the draft LoRA and its denoise steps do not, so forwards mix rows with and without it
    if "p" not in _LLMS:
        _LLMS["p"] = LLM(model=str(path), num_kv_tokens=96, max_model_len=96, max_num_seqs=4, draft_lora=True,
                         diffusion_lora=False)
    return _LLMS["p"]


def _reference_llm(path) -> LLM:
    if "r" not in _LLMS:
        _LLMS["r"] = LLM(model=str(path), num_kv_tokens=4096, draft_lora=True, diffusion_lora=False)
    return _LLMS["r"]


def test_a_failing_forward_fails_only_its_batch(tiny_llm):
    eng = tiny_llm.engine
    eng.add_request("bad", [5, 6, 7], _params("ar", 5))
    error = step_with_a_failing_forward(eng)
    assert error.request_ids == ["bad"]
    for rid in error.request_ids:
        eng.abort_request(rid)
    assert eng.num_free_blocks == eng.num_total_blocks
    out = tiny_llm.generate([[5, 6, 7]], _params("self_spec", 5))[0]
    assert len(out.token_ids) == 5


def test_a_failing_forward_fails_every_mode_it_carried_and_no_waiting_request(tiny_ckpt):
    """One forward carries every running sequence, so a failure inside it fails all of them, whatever their
    modes; a request still waiting for admission is untouched and later decodes exactly as it would have."""
    llm = LLM(model=str(tiny_ckpt), num_kv_tokens=4096, max_num_seqs=2)
    eng = llm.engine
    prompts = _prompts(3, seed=17)
    expected = _reference_llm(tiny_ckpt).generate([prompts[2]], _params("self_spec", 9))[0].token_ids
    for rid, p, mode in zip(("ar", "diffusion", "waiting"), prompts, ("ar", "diffusion", "self_spec")):
        eng.add_request(rid, p, _params(mode, 9))
    eng.step()  # both running requests' prefill
    error = step_with_a_failing_forward(eng)
    assert sorted(error.request_ids) == ["ar", "diffusion"]
    for rid in error.request_ids:
        eng.abort_request(rid)
    out: list[int] = []
    while eng.has_unfinished():
        out += [t for o in eng.step() for t in o.new_token_ids]
    assert out == expected
    assert eng.num_free_blocks == eng.num_total_blocks
