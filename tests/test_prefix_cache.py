"""Automatic prefix caching: cached == uncached (greedy, every mode) for shared prefixes, n > 1, preemption, aborts
and chunked prefill; the pool's counts exact after every test; salts isolate; a forward never writes a shared or
cached block; a hypothesis interleaving of add / abort / step over shared prefixes never leaks."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.decoding.modes import MODES
from engine.kv_cache import KV_ADAPTER, BlockManager, block_hash
from engine.llm import LLM
from engine.sequence import SamplingParams, Sequence
from tests.conftest import assert_kv_idle
from tests.engine_faults import step_with_a_failing_forward

PREFIX = [random.Random(5).randrange(4, 96) for _ in range(40)]  # 2 full 16-token blocks and 8 tokens


def _prompts(n: int, seed: int, prefix: list[int] = PREFIX) -> list[list[int]]:
    rng = random.Random(seed)
    return [prefix + [rng.randrange(4, 96) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


def _params(mode: str, max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, mode=mode, ignore_eos=True,
                          threshold=0.8 if mode == "diffusion" else None, **kw)


_LLMS: dict[str, LLM] = {}


def _llm(tiny_ckpt, name: str, **kw) -> LLM:
    """Engines shared by the tests of this module (each test leaves them idle, and `_clean` empties the cache)."""
    if name not in _LLMS:
        _LLMS[name] = LLM(model=str(tiny_ckpt), **kw)
    return _LLMS[name]


def _uncached(tiny_ckpt) -> LLM:
    return _llm(tiny_ckpt, "off", num_kv_tokens=8192, max_num_seqs=16, enable_prefix_caching=False)


def _pressure(tiny_ckpt) -> LLM:
    """8 pages of 16 tokens, at most 4 sequences, 24-token forwards: preemption, eviction and chunked prefill."""
    return _llm(tiny_ckpt, "pressure", num_kv_tokens=128, max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=24)


def _clean(llm: LLM) -> None:
    assert_kv_idle(llm.engine)
    llm.engine.reset_prefix_cache()


def _hits(llm: LLM) -> int:
    return llm.engine.scheduler.prefix_cache_hits


# ---- the block manager alone --------------------------------------------------------------------------------------
def test_block_hash_covers_parent_tokens_salt_and_adapter():
    base = block_hash(None, [1, 2, 3], None, KV_ADAPTER)
    assert base == block_hash(None, [1, 2, 3], None, KV_ADAPTER)
    others = [block_hash(base, [1, 2, 3], None, KV_ADAPTER), block_hash(None, [1, 2, 4], None, KV_ADAPTER),
              block_hash(None, [1, 2, 3], "salt", KV_ADAPTER), block_hash(None, [1, 2, 3], None, "lora-a"),
              block_hash(None, [1, 2, 3], "", "x")]
    assert len({base, *others}) == 1 + len(others)


def _seq(rid: str, tokens: list[int], salt: str | None = None) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(cache_salt=salt), frozenset())


def test_released_cached_blocks_stay_until_the_pool_runs_dry_then_go_least_recently_released_first():
    bm = BlockManager(4, 2)
    a, b = _seq("a", [1, 2, 3, 4]), _seq("b", [5, 6, 7, 8])
    for s in (a, b):
        bm.allocate(s, 4)
        bm.cache_blocks(s, 4)
    first_a, b_blocks = a.block_table[0], list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4
    bm.check_invariants([])
    # a new sequence with a's tokens takes a's blocks back
    a2 = _seq("a2", [1, 2, 3, 4, 9])
    hit = bm.match(a2, 4)
    assert hit[0] == first_a and len(hit) == 2
    bm.take(a2, hit)
    bm.check_invariants([a2])
    bm.free(a2)
    # b was released before a2: its blocks are evicted first, tail block before head block
    c = _seq("c", [0] * 4)
    bm.allocate(c, 2)
    assert c.block_table == b_blocks[1:] and bm.num_evictions == 1
    assert bm.match(_seq("b2", [5, 6, 7, 8, 0]), 4) == b_blocks[:1]
    bm.allocate(c, 4)
    assert c.block_table == b_blocks[::-1] and bm.match(_seq("b3", [5, 6, 7, 8, 0]), 4) == []
    assert len(bm.match(_seq("a3", [1, 2, 3, 4, 0]), 4)) == 2
    bm.check_invariants([c])
    bm.free(c)
    assert bm.reset() == 2 and bm.num_cached_blocks == 0 and bm.num_free_blocks == 4
    bm.check_invariants([])


def test_a_salt_or_another_prefix_never_matches():
    bm = BlockManager(8, 2)
    a = _seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    bm.cache_blocks(a, 4)
    assert len(bm.match(_seq("same", [1, 2, 3, 4, 9]), 4)) == 2
    assert bm.match(_seq("salted", [1, 2, 3, 4, 9], salt="tenant-b"), 4) == []
    assert bm.match(_seq("other-head", [0, 2, 3, 4, 9]), 4) == []  # the chain: block 2 alone never matches
    bm.free(a)
    bm.check_invariants([])


def test_writing_into_a_shared_or_cached_block_is_refused():
    bm = BlockManager(8, 2)
    a, b = _seq("a", [1, 2, 3, 4, 5]), _seq("b", [1, 2, 3, 4, 6])
    bm.allocate(a, 5)
    bm.cache_blocks(a, 4)
    bm.check_writable(a, 4, 5)  # its own private tail
    with pytest.raises(AssertionError, match="would write"):
        bm.check_writable(a, 3, 5)  # position 3 is in a cached block
    bm.take(b, bm.match(b, 4))
    with pytest.raises(AssertionError, match="would write"):
        bm.check_writable(b, 2, 4)
    with pytest.raises(AssertionError, match="crop of shared"):
        bm.crop(b, 2)
    bm.free(a)
    bm.free(b)
    bm.check_invariants([])


# ---- the engine: cached == uncached -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_greedy_outputs_equal_with_caching_on_and_off_for_shared_prefixes(tiny_llm, tiny_ckpt, mode):
    prompts = _prompts(5, seed=1)
    params = _params(mode)
    expected = [o.token_ids for o in _uncached(tiny_ckpt).generate(prompts, params)]
    first = tiny_llm.generate(prompts[:1], params)[0].token_ids  # warms the cache with the shared prefix
    hits = _hits(tiny_llm)
    assert [first] + [o.token_ids for o in tiny_llm.generate(prompts[1:], params)] == expected
    assert _hits(tiny_llm) - hits >= 4 * 32  # every later prompt found the 2 full prefix blocks
    again = tiny_llm.generate(prompts, params)  # now whole prompts (and outputs) are cached
    assert [o.token_ids for o in again] == expected


def test_n_choices_share_the_prompt_blocks_from_the_first_forward(tiny_llm, tiny_ckpt):
    eng = tiny_llm.engine
    prompt = _prompts(1, seed=2)[0]
    params = [_params(m) for m in ("ar", "self_spec", "diffusion")]
    expected = [o.token_ids for o in _uncached(tiny_ckpt).generate([prompt] * 3, params)]
    for j, p in enumerate(params):
        eng.add_request(f"n{j}", prompt, p)
    outs = {f"n{j}": [] for j in range(3)}
    for o in eng.step():
        outs[o.request_id] += o.new_token_ids
    tables = [s.block_table[:2] for s in eng.scheduler.running]
    assert tables[0] == tables[1] == tables[2]  # one copy of the prompt's 2 full blocks, three references
    # the first choice computed the prompt, the others only their last (uncached) part
    assert eng.last_stats.num_query_tokens == len(prompt) + 2 * (len(prompt) - 32)
    assert eng.last_stats.prefix_cache_hits == 2 * 32
    eng.check_kv_invariants()
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
        eng.check_kv_invariants()
    assert [outs[f"n{j}"] for j in range(3)] == expected


def test_a_fully_cached_prompt_still_computes_its_last_token(tiny_llm, tiny_ckpt):
    eng = tiny_llm.engine
    for length in (32, 33):  # a prompt of exactly 2 blocks reuses 1: its last token is in the 2nd
        prompt = PREFIX[:length]
        expected = _uncached(tiny_ckpt).generate([prompt], _params("ar"))[0].token_ids
        tiny_llm.generate([prompt], _params("ar"))
        eng.add_request("again", prompt, _params("ar"))
        out = eng.step()[0]
        assert out.num_cached_tokens == (16 if length == 32 else 32)
        assert eng.last_stats.num_query_tokens == length - out.num_cached_tokens
        while eng.has_unfinished():
            out.new_token_ids += [t for o in eng.step() for t in o.new_token_ids]
        assert out.new_token_ids == expected


def test_preemption_over_shared_prefixes_keeps_greedy_outputs(tiny_ckpt):
    prompts = _prompts(6, seed=3)
    params = [_params(MODES[i % len(MODES)], 24) for i in range(6)]
    expected = [o.token_ids for o in _uncached(tiny_ckpt).generate(prompts, params)]
    small = _pressure(tiny_ckpt)
    preempted, hits = small.engine.scheduler.num_preemptions, _hits(small)
    assert [o.token_ids for o in small.generate(prompts, params)] == expected
    assert small.engine.scheduler.num_preemptions > preempted and _hits(small) > hits
    _clean(small)


def test_chunked_prefill_over_cached_blocks_keeps_greedy_outputs(tiny_ckpt):
    prompts = _prompts(4, seed=4)
    params = [_params(MODES[i % len(MODES)]) for i in range(4)]
    expected = [o.token_ids for o in _uncached(tiny_ckpt).generate(prompts, params)]
    chunked = _pressure(tiny_ckpt)  # prompts of 43+ tokens in 24-token forwards
    assert [o.token_ids for o in chunked.generate(prompts, params)] == expected
    assert [o.token_ids for o in chunked.generate(prompts, params)] == expected  # cached now
    assert _hits(chunked) > 0
    _clean(chunked)


def test_aborting_a_sharer_leaves_the_others_unchanged(tiny_llm, tiny_ckpt):
    eng = tiny_llm.engine
    prompts = _prompts(3, seed=6)
    params = [_params(m, 16) for m in ("diffusion", "ar", "self_spec")]
    expected = [o.token_ids for o in _uncached(tiny_ckpt).generate(prompts, params)]
    outs = {f"s{i}": [] for i in range(3)}
    for i in range(3):
        eng.add_request(f"s{i}", prompts[i], params[i])
    for step in range(4):
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
        if step == 1:
            eng.abort_request("s1")  # holds the shared prefix blocks with the other two
        eng.check_kv_invariants()
    eng.add_request("late", prompts[1], params[1])  # the aborted one's prompt again: its blocks are cached
    outs["late"] = []
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
        eng.check_kv_invariants()
    assert [outs["s0"], outs["s2"], outs["late"]] == [expected[0], expected[2], expected[1]]


def test_another_cache_salt_never_hits(tiny_llm):
    eng = tiny_llm.engine
    prompt = _prompts(1, seed=7)[0]
    tiny_llm.generate([prompt], _params("ar", 4, cache_salt="tenant-a"))
    cached = {}
    for salt in ("tenant-b", None, "tenant-a"):
        eng.add_request(f"salt-{salt}", prompt, _params("ar", 4, cache_salt=salt))
        cached[salt] = eng.step()[0].num_cached_tokens
        while eng.has_unfinished():
            eng.step()
    assert cached == {"tenant-b": 0, None: 0, "tenant-a": 32}
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")


def test_prompt_logprobs_bypass_the_cache_and_score_every_prompt_token(tiny_llm, tiny_ckpt):
    prompt = _prompts(1, seed=8)[0]
    params = _params("ar", 4, prompt_logprobs=2)
    expected = _uncached(tiny_ckpt).generate([prompt], params)[0]
    tiny_llm.generate([prompt], _params("ar", 4))  # caches the prompt
    eng = tiny_llm.engine
    eng.add_request("plp", prompt, params)
    first = eng.step()[0]
    assert first.num_cached_tokens == 0 and eng.last_stats.num_query_tokens == len(prompt)
    while eng.has_unfinished():
        eng.step()
    assert len(first.prompt_logprobs) == len(prompt) == len(expected.prompt_logprobs)
    for a, b in zip(expected.prompt_logprobs[1:], first.prompt_logprobs[1:]):
        assert abs(a.logprob - b.logprob) < 2e-4 and a.top[0][0] == b.top[0][0]


def test_reset_forgets_cached_blocks_but_not_blocks_in_use(tiny_llm):
    eng = tiny_llm.engine
    prompt = _prompts(1, seed=9)[0]
    tiny_llm.generate([prompt], _params("ar", 4))
    eng.add_request("live", prompt, _params("ar", 8))
    assert eng.step()[0].num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert eng.reset_prefix_cache() > 0
    eng.check_kv_invariants()
    eng.add_request("after", prompt, _params("ar", 4))
    outs = {o.request_id: o for o in eng.step()}
    assert outs["after"].num_cached_tokens == 0  # nothing left to match, though "live" still holds its blocks
    while eng.has_unfinished():
        eng.step()


def test_a_failed_forward_unregisters_the_blocks_it_was_to_write(tiny_llm, tiny_ckpt):
    eng = tiny_llm.engine
    prompt = _prompts(1, seed=10)[0]
    for j in range(2):
        eng.add_request(f"f{j}", prompt, _params("ar", 4))
    error = step_with_a_failing_forward(eng)
    for rid in error.request_ids:
        eng.abort_request(rid)
    assert eng.scheduler.blocks.num_cached_blocks == 0  # the prompt's blocks never got their K/V
    eng.check_kv_invariants()
    expected = _uncached(tiny_ckpt).generate([prompt], _params("ar", 4))[0].token_ids
    assert tiny_llm.generate([prompt], _params("ar", 4))[0].token_ids == expected


# ---- interleavings ------------------------------------------------------------------------------------------------
_REFERENCE: dict[tuple, list[int]] = {}
_SHARED = _prompts(4, seed=20, prefix=PREFIX[:20]) + _prompts(2, seed=21)


def _x_params(x: int) -> SamplingParams:
    return _params(MODES[x % len(MODES)], 6 + x % 9)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "abort", "step", "step", "step"]),
                              st.integers(0, 10_000)), min_size=4, max_size=30))
def test_random_add_abort_step_over_shared_prefixes_never_leaks_or_writes_a_shared_block(tiny_ckpt, ops):
    """8 pages of 16 tokens for prompts sharing 20- and 40-token prefixes: hits, evictions, preemptions and chunked
    prefills. The pool's counts are checked after every operation; `check_writable` refuses any forward that
    would write a shared or cached block; survivors equal the uncached engine's output."""
    llm = _pressure(tiny_ckpt)
    eng = llm.engine
    live: dict[str, int] = {}  # request id -> its x, until it finishes or is aborted
    outs: dict[str, list[int]] = {}
    done: dict[str, int] = {}

    def step() -> None:
        for o in eng.step():
            outs[o.request_id] += o.new_token_ids
            if o.finished:
                done[o.request_id] = live.pop(o.request_id)

    for n, (op, x) in enumerate(ops):
        if op == "add":
            rid = f"h{n}"
            live[rid], outs[rid] = x, []
            eng.add_request(rid, _SHARED[x % len(_SHARED)], _x_params(x))
        elif op == "abort" and live:
            rid = sorted(live)[x % len(live)]
            eng.abort_request(rid)
            live.pop(rid)
        else:
            step()
        eng.check_kv_invariants()
    while eng.has_unfinished():
        step()
        eng.check_kv_invariants()
    assert not live
    _clean(llm)
    for rid, x in done.items():
        key = (x % len(_SHARED), x % len(MODES), 6 + x % 9)
        if key not in _REFERENCE:
            _REFERENCE[key] = _uncached(tiny_ckpt).generate([_SHARED[key[0]]], _x_params(x))[0].token_ids
        assert outs[rid] == _REFERENCE[key], rid
