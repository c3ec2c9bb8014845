"""The decoders' seams: one list of modes checked against the registry, forward names that are the metric labels,
counters the engine sums without knowing them and the server maps onto its series, and the preemption hook."""

from __future__ import annotations

import importlib
import pickle
import subprocess
import sys

import pytest

from engine.decoding import modes
from engine.decoding.diffusion import BlockDiffusion, DiffusionState
from engine.decoding.modes import COUNTERS, MODES, OBSERVATIONS
from engine.decoding.registry import DECODERS
from engine.forward import BatchKey, Forward
from engine.sequence import SamplingParams, Sequence, StepStats
from server.metrics import ServerMetrics


def test_the_light_modules_import_without_torch():
    """The server process imports the config, the request types, the forward names and the metrics: no torch."""
    code = ("import sys, engine.config, engine.sequence, engine.forward, engine.batch, engine.decoding.modes, "
            "server.metrics; assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert engine.config.MODES is engine.decoding.modes.MODES")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_registry_serves_every_mode_and_refuses_a_mode_without_a_decoder(monkeypatch):
    import engine.decoding.registry as registry

    assert tuple(DECODERS) == MODES
    monkeypatch.setattr(modes, "MODES", (*MODES, "beam"))
    with pytest.raises(ImportError, match="beam"):
        importlib.reload(registry)
    monkeypatch.undo()
    importlib.reload(registry)  # leave a consistent registry module behind


def test_forward_names_are_the_metric_labels_and_survive_pickling():
    assert [str(f) for f in Forward] == ["prefill", "ar_decode", "denoise", "commit", "draft", "verify"]
    assert [f for f in Forward if f.causal] == [Forward.PREFILL, Forward.AR_DECODE, Forward.COMMIT, Forward.VERIFY]
    stats = StepStats(forward_kind=Forward.DENOISE, counters={"x": 1})
    back = pickle.loads(pickle.dumps(stats))  # StepStats crosses from the engine process to the server's
    assert back.forward_kind is Forward.DENOISE and back == stats
    # the batching key: equal knobs batch together, any differing knob does not
    assert len({BatchKey(Forward.DENOISE, True, 8, 4), BatchKey(Forward.DENOISE, True, 8, 4)}) == 1
    assert BatchKey(Forward.DENOISE, True, 8, 4) != BatchKey(Forward.DENOISE, True, 8, 2)


def test_every_counter_a_decoder_reports_reaches_its_series(tiny_llm, monkeypatch):
    """Run every mode, sum the engine's step counters by name, and feed the same steps to the server's metrics:
    the spec_decode_* counters and the denoise-steps histogram hold exactly those sums."""
    eng = tiny_llm.engine
    metrics = ServerMetrics("m")
    # auto's choices follow measured costs: alternate them, so that both of its counters are certain to appear
    monkeypatch.setattr(eng.decoder_ctx.auto, "decide", lambda seq, st: ("self_spec", 8) if (
        st.ar_iterations + sum(st.rounds.values())) % 2 == 0 else ("ar", 0))
    for i, mode in enumerate(MODES * 2):
        eng.add_request(f"c{i}", [5 + i, 6, 7], SamplingParams(max_tokens=20, mode=mode, ignore_eos=True))
    counters: dict[str, int] = {}
    observations: dict[str, list[float]] = {}
    kinds = set()
    while eng.has_unfinished():
        eng.step()
        stats = eng.last_stats
        metrics.on_step(stats)
        kinds.add(stats.forward_kind)
        for name, amount in stats.counters.items():
            counters[name] = counters.get(name, 0) + amount
        for name, values in stats.observations.items():
            observations.setdefault(name, []).extend(values)
    # (grammar_forced_tokens needs a grammar, so a tokenizer: tests/server/test_jump_forward.py checks its series)
    assert set(counters) == set(COUNTERS) - {modes.GRAMMAR_FORCED_TOKENS} and set(observations) == set(OBSERVATIONS)
    value = metrics.registry.get_sample_value
    label = {"model_name": "m"}
    assert value("trimode:spec_decode_num_drafts_total", label) == counters[modes.SPEC_DRAFTS] > 0
    assert value("trimode:spec_decode_num_draft_tokens_total", label) == counters[modes.SPEC_DRAFT_TOKENS]
    assert value("trimode:spec_decode_num_accepted_tokens_total", label) == counters[modes.SPEC_ACCEPTED_TOKENS]
    for chosen in modes.AUTO_CHOICES:
        assert value("trimode:auto_iterations_total", {**label, "chosen": chosen}) == \
            counters[modes.AUTO_ITERATIONS[chosen]] > 0
    steps = observations[modes.DENOISE_STEPS_PER_BLOCK]
    assert value("trimode:diffusion_denoise_steps_per_block_count", label) == len(steps) > 0
    assert value("trimode:diffusion_denoise_steps_per_block_sum", label) == sum(steps)
    for kind in kinds - {None}:
        assert value("trimode:batch_size_count", {**label, "forward_kind": kind.value}) > 0


def test_a_resolved_diffusion_block_owes_the_recompute_its_next_seed():
    """Preemption hook: a block emitted before its commit forward makes the recompute sample the next seed; any
    other round is simply dropped."""
    seq = Sequence("p", [5, 6, 7], 3, SamplingParams(mode="diffusion", block_length=4, steps=4), frozenset())
    diffusion = BlockDiffusion()
    seq.state = DiffusionState([7, 8, 9, 10], steps_done=3, resolved=True)
    assert diffusion.reset_for_recompute(seq) is True and seq.state is None
    seq.state = DiffusionState([7, 8, 0, 0], steps_done=1)
    assert diffusion.reset_for_recompute(seq) is False and seq.state is None
    for mode in ("ar", "self_spec"):
        seq.state = object()
        assert DECODERS[mode].reset_for_recompute(seq) is False and seq.state is None
