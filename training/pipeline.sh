#!/usr/bin/env bash
# The whole trimode-tiny recipe, seeded, in order. Every step is resumable or cheap to rerun.
# Usage: bash training/pipeline.sh [from-step]   (steps: corpus tokenizer base distill eval)
set -euo pipefail
cd "$(dirname "$0")/.."
R=training/runs
FROM=${1:-corpus}
STEPS=${BASE_STEPS:-1000}
DECAY=${BASE_DECAY:-250}
run() { case "$FROM" in corpus) return 0;; tokenizer) [[ $1 != corpus ]];; base) [[ $1 != corpus && $1 != tokenizer ]];;
        distill) [[ $1 == distill || $1 == eval ]];; eval) [[ $1 == eval ]];; esac; }
if run corpus; then python -m training.corpus; fi
if run tokenizer; then python -m training.tokenizer --vocab-size 4096 --out $R/tokenizer; fi
if run base; then
  python -m training.train --tokenizer $R/tokenizer --out $R/base --steps "$STEPS" --decay "$DECAY" --seed 0
fi
if run distill; then
  python -m training.evaluate --model $R/base/final --out $R/eval_base.json > $R/eval_base.log 2>&1 &
  python -m training.distill generate --model $R/base/final --out $R/distill/gen.jsonl --n 3072 --max-tokens 128 \
    --seed 0
  python -m training.distill train --model $R/base/final --data $R/distill/gen.jsonl --out $R/distill \
    --steps "${DISTILL_STEPS:-800}" --full-share 0.85 --seed 0
  wait
fi
if run eval; then
  python -m training.evaluate --model $R/distill/final --out $R/eval_distilled.json
fi
