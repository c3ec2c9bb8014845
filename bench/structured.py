"""Structured outputs' cost: output tokens/s with a JSON schema vs unconstrained, in `ar` and `self_spec`, on the
built-in model (or `--model`), and self_spec's acceptance with and without the grammar.

    python -m bench.structured [--batch 1 8] [--max-tokens 128] [--repeats 3]

Each case runs `--batch` requests at once through the engine (greedy, chat prompts) and reports output tokens per
wall second and per CPU second (median of the repeats, after one warm-up round; the rounds interleave the cases so
load from other processes hits all alike), and for self_spec the drafts accepted per draft token checked
(`spec_accepted_tokens / spec_draft_tokens`) and tokens per verify. Constrained requests stop when their JSON is
complete; each unconstrained request runs (`ignore_eos`) to the length its constrained twin reached in the same
round, so both emit the same tokens per request and the batch thins out alike. The time of a step is split into the
forward and the rest (scheduling, the decoders, the grammar): the rest's growth per step is the grammar's own cost,
while tokens per step follow acceptance, which depends on what the model writes under the grammar. The grammar is
compiled once up front, as the server's cache would have it; its compile time is printed apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

SCHEMA = {
    "type": "object",
    "properties": {
        "speaker": {"type": "string", "maxLength": 16},
        "mood": {"enum": ["merry", "sad", "angry", "calm"]},
        "lines": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 2},
    },
    "required": ["speaker", "mood", "lines"],
    "additionalProperties": False,
}
PROMPTS = ["Who speaks first, and what do they say?", "Write two lines for the king.", "What does the fool reply?",
           "Tell me of the storm.", "Who is at the gate?", "Speak of love.", "What news from the war?",
           "Answer the duke."]


@dataclass
class Result:
    mode: str
    constrained: bool
    batch: int
    tokens: int
    seconds: float
    cpu_seconds: float
    accepted: int = 0
    drafted: int = 0
    drafts: int = 0
    valid: int = 0  # constrained: outputs finished with stop that parse and validate
    finished: int = 0
    steps: int = 0  # engine steps (one forward each)
    forward_seconds: float = 0.0  # wall time inside the model forwards
    lengths: list[int] | None = None  # output tokens per request, in request order


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return ap.parse_args(argv)


def _timed_forwards(engine) -> list[float]:
    """Wrap the engine's model runner so each forward's wall time is added to the returned cell."""
    spent = [0.0]
    run = engine.runner.run

    def timed(batch):
        t = time.perf_counter()
        try:
            return run(batch)
        finally:
            spent[0] += time.perf_counter() - t

    engine.runner.run = timed
    return spent


def _run(engine, prompts: list[list[int]], params: list, tag: str, spent: list[float]) -> Result:
    from engine.decoding.modes import SPEC_ACCEPTED_TOKENS, SPEC_DRAFT_TOKENS, SPEC_DRAFTS

    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", ids, params[i])
    texts: dict[str, list[int]] = {f"{tag}-{i}": [] for i in range(len(prompts))}
    reasons: dict[str, str] = {}
    res = Result(params[0].mode, params[0].structured is not None, len(prompts), 0, 0.0, 0.0)
    spent[0] = 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    while engine.has_unfinished():
        for out in engine.step():
            texts.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
        res.steps += 1
        c = engine.last_stats.counters
        res.accepted += c.get(SPEC_ACCEPTED_TOKENS, 0)
        res.drafted += c.get(SPEC_DRAFT_TOKENS, 0)
        res.drafts += c.get(SPEC_DRAFTS, 0)
    res.seconds, res.cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    res.forward_seconds = spent[0]
    res.lengths = [len(t) for t in texts.values()]
    res.tokens = sum(res.lengths)
    if res.constrained:
        import jsonschema

        for rid, toks in texts.items():
            if reasons.get(rid) != "stop":
                continue
            res.finished += 1
            try:
                jsonschema.validate(json.loads(engine.tokenizer.decode(toks, skip_special_tokens=True)), SCHEMA)
                res.valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    return res


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import torch

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.grammar import GrammarCompilerCache
    from engine.sequence import SamplingParams
    from engine.structured import GrammarSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model=args.model, device="cpu"))
    tok = engine.tokenizer
    t0 = time.perf_counter()
    cache = GrammarCompilerCache(tok, engine.model_config.vocab_size)
    spec = GrammarSpec("json", json.dumps(SCHEMA), "response_format")
    spec = GrammarSpec(spec.kind, spec.source, spec.field, cache.serialized(spec))
    print(f"schema compiled and serialized in {1000 * (time.perf_counter() - t0):.1f} ms "
          f"({len(spec.compiled or '')} bytes); vocabulary {engine.model_config.vocab_size}")
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    cases = [(mode, batch) for batch in args.batch for mode in ("ar", "self_spec")]
    runs: dict[tuple, list[Result]] = {(m, c, b): [] for m, b in cases for c in (False, True)}
    spent = _timed_forwards(engine)
    for rnd in range(args.repeats + 1):
        for mode, batch in cases:
            prompts = [tok.encode(chats[i % len(chats)], add_special_tokens=False) for i in range(batch)]
            constrained = SamplingParams(max_tokens=args.max_tokens, mode=mode, structured=spec)
            twin = _run(engine, prompts, [constrained] * batch, f"{rnd}-{mode}-json-{batch}", spent)
            free = [SamplingParams(max_tokens=max(n, 1), mode=mode, ignore_eos=True) for n in twin.lengths or []]
            base = _run(engine, prompts, free, f"{rnd}-{mode}-free-{batch}", spent)
            if rnd:  # round 0 warms up
                runs[(mode, True, batch)].append(twin)
                runs[(mode, False, batch)].append(base)
    print("\n| batch | mode | output | tokens | tok/s | tok/CPU-s | vs unconstrained | forward ms/step | "
          "rest ms/step | "
          "accepted/drafted | tokens/verify | valid |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, batch in cases:
        base = None
        for constrained in (False, True):
            rs = runs[(mode, constrained, batch)]
            tps = statistics.median(r.tokens / r.seconds for r in rs)
            cps = statistics.median(r.tokens / r.cpu_seconds for r in rs)
            base = tps if base is None else base
            r = rs[-1]
            acc = f"{r.accepted / r.drafted:.2f}" if r.drafted else "-"
            per_verify = f"{(r.accepted + r.drafts) / r.drafts:.2f}" if r.drafts else "-"
            valid = f"{r.valid}/{r.finished} of {batch}" if constrained else "-"
            fwd = statistics.median(1000 * r.forward_seconds / r.steps for r in rs)
            rest = statistics.median(1000 * (r.seconds - r.forward_seconds) / r.steps for r in rs)
            print(f"| {batch} | {mode} | {'JSON schema' if constrained else 'free'} | {r.tokens} | {tps:.0f} | "
                  f"{cps:.0f} | {100 * tps / base:.0f} % | {fwd:.1f} | {rest:.2f} | {acc} | {per_verify} | {valid} |")


if __name__ == "__main__":
    main()
