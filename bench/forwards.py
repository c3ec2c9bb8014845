"""`python -m bench.forwards`: what one forward of each kind costs, and the acceptance a mode needs to win.

Every mode pays per forward, and they pay for different forwards: `ar` one causal token per sequence, `self_spec`
a bidirectional draft and a causal verify over a whole block (`--block-length`, default the checkpoint's), and
`diffusion` bidirectional denoise passes over the block then one causal commit. This times each kind through the
real runner (paged KV, the kernels the engine would use) for `--batch` sequences with `--context` tokens already
cached, median of `--repeats` rounds, and prints the break-even points that follow from the costs alone:

- `self_spec` beats `ar` at this batch only if an iteration (draft + verify) yields more than
  `(draft + verify) / decode` tokens (accepted drafts plus the bonus);
- `diffusion` beats `ar` only if it commits more than `denoise / decode` tokens per forward (the commit pass, one
  per block, comes on top).

On a GPU a 16-token forward of a large model costs about what a 1-token one does (both read every weight once), so
both modes win easily at low batch; on a CPU the block's GEMMs are real work and the bar is higher. The server's
scheduler, sampling and HTTP come on top of these figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.batch import Batch
from engine.config import EngineConfig
from engine.engine import Engine
from engine.forward import BatchKey, Forward, ForwardRequest
from engine.sequence import SamplingParams, Sequence


def time_forwards(engine: Engine, batch: int, context: int, block: int, repeats: int,
                  calls: int = 20) -> dict[str, float]:
    """Milliseconds per forward of each kind (median of `repeats` rounds of `calls`); the KV cache is left as found."""
    runner, blocks = engine.runner, engine.scheduler.blocks
    need = -(-(context + block) // blocks.block_size)  # pages per sequence
    if not blocks.can_allocate(need * batch):
        raise ValueError(f"context={context} + block_length={block} for batch={batch} does not fit the KV pool "
                         f"({blocks.num_free_blocks} free blocks)")
    vocab = engine.model_config.vocab_size
    seqs = []
    for i in range(batch):
        prompt = [(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(context)]
        seq = Sequence(f"bench-{i}", prompt, context, SamplingParams(max_tokens=block), frozenset())
        blocks.allocate(seq, context + block)
        seq.num_computed_tokens = context
        seqs.append(seq)
    ctx = engine.decoder_ctx
    draft = [5] + [ctx.mask_id if ctx.mask_id is not None else 0] * (block - 1)
    kinds = {
        "ar decode": (Forward.AR_DECODE, [5], False),
        "self_spec draft": (Forward.DRAFT, draft, ctx.spec_lora),
        "self_spec verify": (Forward.VERIFY, [5] * block, False),
        "diffusion denoise": (Forward.DENOISE, draft, ctx.diffusion_lora),
        "diffusion commit": (Forward.COMMIT, [5] * block, False),
    }
    batches = {name: Batch(seqs, [ForwardRequest(BatchKey(forward, draft_lora=lora), list(ids),
                                                 all_logits=len(ids) > 1) for _ in seqs])
               for name, (forward, ids, lora) in kinds.items()}
    rounds: dict[str, list[float]] = {name: [] for name in batches}
    try:
        for b in batches.values():
            runner.run(b)  # warm-up: oneDNN primitives, first-touch pages
        for _ in range(repeats):  # the kinds take turns, so drift in the machine's speed hits them alike
            for name, b in batches.items():
                t = time.perf_counter()
                for _ in range(calls):
                    runner.run(b)
                rounds[name].append((time.perf_counter() - t) / calls * 1e3)
        return {name: statistics.median(v) for name, v in rounds.items()}
    finally:
        for seq in seqs:
            blocks.free(seq)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m bench.forwards", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the built-in trimode-tiny)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=1, help="sequences per forward")
    p.add_argument("--context", type=int, default=100, help="tokens already cached per sequence")
    p.add_argument("--block-length", type=int, default=None, help="draft / denoise block (default: checkpoint's)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("batch", "context", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model=args.model, device="cpu", dtype=args.dtype, num_threads=args.threads))
    if not engine.is_trimode:
        raise SystemExit(f"{engine.model_name} is not a tri-mode checkpoint: it has only ar forwards")
    block = args.block_length or engine.model_config.block_size
    if block < 2:
        p.error("--block-length must be >= 2")
    ms = time_forwards(engine, args.batch, args.context, block, args.repeats)
    decode = ms["ar decode"]
    print(f"{engine.model_name}, {args.dtype}, {args.threads} thread(s), batch {args.batch}, {args.context} cached "
          f"tokens per sequence, block {block} ({engine.runner.ops.name} ops)\n")
    print("| forward | query tokens per sequence | ms | vs ar decode |")
    print("|---|---:|---:|---:|")
    for name, t in ms.items():
        q = 1 if name == "ar decode" else block
        print(f"| {name} | {q} | {t:.3f} | {t / decode:.2f}x |")
    spec = (ms["self_spec draft"] + ms["self_spec verify"]) / decode
    diff = ms["diffusion denoise"] / decode
    print(f"\nself_spec beats ar at batch {args.batch} only above {spec:.2f} tokens per draft/verify iteration "
          f"(accepted drafts + the bonus; at most {block}).")
    print(f"diffusion beats ar at batch {args.batch} only above {diff:.2f} tokens per denoise forward "
          f"(plus one commit forward per block).")
    return ms


if __name__ == "__main__":
    main()
