"""`python -m bench.spec_acceptance`: self_spec's tokens per decode forward, with a standard error.

Tokens per decode forward (`CompletionOutput.tokens_per_forward`: output tokens / forwards after the prefill) is a
count, not a timing: another process on the machine cannot move it, only the sampling can. This tool runs
`--prompts` held-out prompts (`training/data/prompts.jsonl`) for `--max-tokens` tokens with `ignore_eos`, mode
`self_spec`, at every temperature of `--temperatures`, once per seed of `--seeds`; every request has a seed of its
own (`SamplingParams.seed`: a self_spec request then draws from its own generator, so the figures do not depend on
the batch, and one (prompt, seed) pair is one independent sample). Per temperature it prints:

- tokens per decode forward: the mean over requests, with its standard error (the spread of the per-request
  figures / sqrt(requests)), and the pooled ratio (all output tokens / all decode forwards);
- accepted drafts per draft/verify round (the engine's `spec_accepted_tokens` / `spec_drafts` counters) and the
  share of drafts kept (accepted / drafted).

Two runs whose tokens per forward differ by more than about 2 x the larger standard error differ beyond the
sampling noise. `--overlap` also prints, per draft position, the expected acceptance sum_x min(p(x), q(x)) of the
verify distribution p against the draft distribution q_s = softmax(draft logits / (s T)) for every draft scale s of
`--scales`, over the positions that real rounds checked: a low-noise way to compare draft distributions, since it
averages an expectation rather than counting coin flips (positions after a rejection are not reached, so later
positions weigh the rounds that got that far).
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, field

import torch

from engine.decoding.modes import SPEC_ACCEPTED_TOKENS, SPEC_DRAFT_TOKENS, SPEC_DRAFTS
from engine.llm import LLM, CompletionOutput
from engine.sequence import SamplingParams
from training.evaluate import load_prompts


@dataclass
class Figures:
    per_request: list[float] = field(default_factory=list)  # tokens per decode forward of each request
    tokens: int = 0
    decode_forwards: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    by_kind: dict[bool, list[int]] = field(default_factory=dict)  # reused drafts?: [rounds, accepted]

    def add(self, outs: list[CompletionOutput], counters: dict[str, int]) -> None:
        self.per_request += [o.tokens_per_forward for o in outs]
        self.tokens += sum(len(o.token_ids) for o in outs)
        self.decode_forwards += sum(o.num_decode_forwards for o in outs)
        self.rounds += counters.get(SPEC_DRAFTS, 0)
        self.drafted += counters.get(SPEC_DRAFT_TOKENS, 0)
        self.accepted += counters.get(SPEC_ACCEPTED_TOKENS, 0)

    def line(self, temperature: float) -> str:
        n = len(self.per_request)
        mean = statistics.fmean(self.per_request)
        se = statistics.stdev(self.per_request) / math.sqrt(n) if n > 1 else float("nan")
        return (f"T={temperature:<4} requests {n:4d}  tokens/forward mean {mean:.4f} +- {se:.4f} (se)  "
                f"pooled {self.tokens / max(self.decode_forwards, 1):.4f}  "
                f"accepted/round {self.accepted / max(self.rounds, 1):.4f}  "
                f"kept {self.accepted / max(self.drafted, 1):.3f} of {self.drafted} drafts  "
                + "  ".join(f"{'reused' if kind else 'fresh'} rounds {r} accepted/round {a / max(r, 1):.4f}"
                            for kind, (r, a) in sorted(self.by_kind.items())))


class Overlaps:
    """sum_x min(p, q_s) per draft position, scale and round kind (fresh drafts, or drafts left over from an earlier
    round's draft forward), from the draft and verify rows of real rounds."""

    def __init__(self, scales: list[float]) -> None:
        self.scales = scales
        self.sums: dict[tuple[bool, float, int], float] = {}
        self.counts: dict[tuple[bool, int], int] = {}

    def install(self) -> None:
        """Wrap SelfSpec's draft and verify to record the rows (one-shot rounds without logits controls only):
        draft rows by (request, absolute position), so a round over leftover drafts finds the rows they came from."""
        import engine.decoding.spec as spec
        from engine.sampling import exclude, probabilities

        draft, verify = spec.SelfSpec._draft, spec.SelfSpec._verify
        rows_at: dict[tuple[str, int], torch.Tensor] = {}

        def _draft(this, st, seq, logits, ctx):
            for i, t in enumerate(st.block):
                if t == ctx.mask_id and i > 0:  # block index i is absolute position st.start + i - 1
                    rows_at[(seq.request_id, st.start + i - 1)] = exclude(logits[i:i + 1], ctx.mask_id)
            return draft(this, st, seq, logits, ctx)

        def _verify(this, st, seq, logits, ctx):
            result = verify(this, st, seq, logits, ctx)
            t = seq.params.temperature
            if t > 0 and seq.logits_pipeline is None and not st.keyed and seq.params.threshold is None:
                reached = min(result.accepted + 1, result.drafted)  # positions whose draft was checked
                rows = [rows_at.get((seq.request_id, st.start + j)) for j in range(reached)]
                if all(r is not None for r in rows) and rows:
                    p = probabilities(logits[:reached], seq.params, ctx.mask_id)
                    raw = torch.cat(rows)  # type: ignore[arg-type]
                    for s in self.scales:
                        q = probabilities(raw / s, seq.params, None)
                        for i, a in enumerate(torch.minimum(p, q).sum(-1).tolist()):
                            self.sums[(st.reused, s, i)] = self.sums.get((st.reused, s, i), 0.0) + a
                    for i in range(reached):
                        self.counts[(st.reused, i)] = self.counts.get((st.reused, i), 0) + 1
            for j in range(result.accepted + 1):  # rows of positions now behind the sequence are never used again
                rows_at.pop((seq.request_id, st.start + j), None)
            return result

        spec.SelfSpec._draft, spec.SelfSpec._verify = _draft, _verify  # type: ignore[method-assign]

    def report(self, temperature: float, positions: int) -> list[str]:
        lines = []
        for kind in (False, True):
            shown = sorted(i for r, i in self.counts if r == kind)[:positions]
            if not shown:
                continue
            lines.append(f"T={temperature} {'reused' if kind else 'fresh'} rounds: sum_x min(p, q_s) by draft position "
                         "(rounds reaching it: " + " ".join(str(self.counts[(kind, i)]) for i in shown) + ")")
            checked = sum(n for (r, _), n in self.counts.items() if r == kind)
            for s in self.scales:
                by_pos = [self.sums[(kind, s, i)] / self.counts[(kind, i)] for i in shown]
                mean = sum(v for (r, sc, _), v in self.sums.items() if r == kind and sc == s) / checked
                lines.append(f"  s={s:<5} " + " ".join(f"{a:.3f}" for a in by_pos)
                             + f"   mean over checked positions {mean:.4f}")
        self.sums.clear()
        self.counts.clear()
        return lines


def count_rounds(figures: Figures) -> None:
    """Wrap SelfSpec's verify to count rounds and accepted drafts by where the drafts came from."""
    import engine.decoding.spec as spec

    verify = spec.SelfSpec._verify

    def _verify(this, st, seq, logits, ctx):
        result = verify(this, st, seq, logits, ctx)
        tally = figures.by_kind.setdefault(st.reused, [0, 0])
        tally[0] += 1
        tally[1] += result.accepted
        return result

    spec.SelfSpec._verify = _verify  # type: ignore[method-assign]
    figures.restore = lambda: setattr(spec.SelfSpec, "_verify", verify)  # type: ignore[attr-defined]


def run(llm: LLM, prompts: list[str], temperature: float, seed: int, args: argparse.Namespace) -> tuple[
        list[CompletionOutput], dict[str, int]]:
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=temperature, ignore_eos=True, mode="self_spec",
                             block_length=args.block_length, seed=seed * 100_003 + i) for i in range(len(prompts))]
    counters: dict[str, int] = {}
    step = llm.engine.step

    def counting_step():
        outs = step()
        for name, amount in llm.engine.last_stats.counters.items():
            counters[name] = counters.get(name, 0) + amount
        return outs

    llm.engine.step = counting_step  # type: ignore[method-assign]
    try:
        return llm.generate(prompts, params), counters
    finally:
        del llm.engine.step


def main(argv: list[str] | None = None) -> dict[float, Figures]:
    """Print the figures of every temperature, and return them."""
    ap = argparse.ArgumentParser(prog="python -m bench.spec_acceptance", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the built-in trimode-tiny)")
    ap.add_argument("--prompts", type=int, default=48, help="held-out prompts (at most the file's 48)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=None, help="self_spec block length (default: the engine's)")
    ap.add_argument("--temperatures", default="1.0,0.7,0", help="comma-separated temperatures")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each gives every prompt a seed of its own")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (figures do not depend on it)")
    ap.add_argument("--overlap", action="store_true", help="also print sum_x min(p, q_s) per draft position")
    ap.add_argument("--scales", default="0.6,0.7,0.8,0.9,1.0,1.1,1.25",
                    help="with --overlap: draft temperature scales s (q_s = softmax(draft logits / (s T)))")
    ap.add_argument("--positions", type=int, default=8, help="with --overlap: draft positions shown")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = load_prompts()[: args.prompts]
    llm = LLM(model=args.model, max_num_seqs=max(64, len(prompts)), num_threads=args.threads)
    overlaps = None
    results: dict[float, Figures] = {}
    if args.overlap:
        overlaps = Overlaps([float(s) for s in args.scales.split(",")])
        overlaps.install()
    for temperature in (float(t) for t in args.temperatures.split(",")):
        figures = Figures()
        count_rounds(figures)
        for seed in (int(s) for s in args.seeds.split(",")):
            figures.add(*run(llm, prompts, temperature, seed, args))
        figures.restore()  # type: ignore[attr-defined]
        results[temperature] = figures
        print(figures.line(temperature), flush=True)
        if overlaps is not None:
            for line in overlaps.report(temperature, args.positions):
                print(line, flush=True)
    return results


if __name__ == "__main__":
    main()
