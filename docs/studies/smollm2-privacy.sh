#!/usr/bin/env bash
# Reproduces docs/studies/smollm2-privacy.md on a CPU (about 1.5 hours on 2 cores, two jobs at a time).
# Needs the fine-tuned target and its retain twin of docs/studies/smollm2-tofu.sh (step 1) in $STUDY/ft,
# and TOFU's JSON-lines files in $TOFU.
# Usage: TOFU=path/to/tofu STUDY=study OUT=privacy bash docs/studies/smollm2-privacy.sh
set -euo pipefail
TOFU=${TOFU:?set TOFU to a folder of TOFU JSON-lines files}
STUDY=${STUDY:?set STUDY to the folder holding ft/target, ft/retain and ft/data}
OUT=${OUT:-privacy}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT/runs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# 1. GA and NPO on the forget10 author (all 20 rows evaluated), every metric family (TOFU, the six
#    MIAs, PrivLeak against the twin, memorisation) before, after and after UWC, and both attacks on
#    the unlearned model; no G-effects (smollm2-tofu.md has them for the same runs); the unlearned
#    model saved for step 3.
for method in ga npo; do
  run="$OUT/runs/$method-none"
  [ -f "$run/summary.md" ] && continue
  python -m fastgeffect.run --model "$STUDY/ft/target" --retain-model "$STUDY/ft/retain" \
      --data-dir "$TOFU" --authors 10 --max-length 160 --method "$method" --epochs 3 --batch-size 4 --lr 5e-5 \
      --geffect-every 0 --eval-size 20 --eval-batch-size 10 --ps-protocol clean --pg-steps "" \
      --eval-metrics all --attacks relearn,quantize --save-model \
      --shared-dir "$OUT/artefacts" --no-progress --out "$run"
done

# 2. The same attacks on the fine-tuned target before unlearning (the same 20 forget rows, in the
#    same order: the fine-tune's data folder; the run's learning rate and token length).
attack=(--retain-model "$STUDY/ft/retain" --data-dir "$STUDY/ft/data" --split forget10 --lr 5e-5
        --max-length 160 --seed 0)
[ -f "$OUT/runs/target-before/attacks.json" ] || \
  python -m fastgeffect.attacks --model "$STUDY/ft/target" "${attack[@]}" --out "$OUT/runs/target-before"

# 3. ... and on each run's UWC model, the mixture at the run's calibrated alpha.
for method in ga npo; do
  run="$OUT/runs/$method-none"
  alpha=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['alpha'])" "$run/metrics_uwc.json")
  [ -f "$OUT/runs/$method-uwc/attacks.json" ] || \
    python -m fastgeffect.attacks --model "$run/model" --uwc-original "$STUDY/ft/target" --uwc-alpha "$alpha" \
        "${attack[@]}" --out "$OUT/runs/$method-uwc"
done

# 4. The twin's per-row Min-K% scores (PrivLeak's bootstrap interval), checked against the AUC the
#    runs used.
[ -f "$OUT/runs/twin_mia_min_k.json" ] || \
  python "$HERE/smollm2_privacy_twin_scores.py" "$OUT/runs/ga-none" --out "$OUT/runs/twin_mia_min_k.json"

# 5. The compact logs the document's tables are built from, then the tables.
for r in ga-none npo-none; do
  mkdir -p "$HERE/smollm2-privacy/logs/$r"
  cp "$OUT/runs/$r"/{config.json,timing.json,metrics_before.json,metrics_after.json,metrics_uwc.json,attacks.json} \
     "$HERE/smollm2-privacy/logs/$r/"
  for e in eval_before eval_after eval_uwc; do
    src="$OUT/runs/$r/$e/mia_scores.json"
    [ -f "$src" ] || src="$OUT/artefacts/$e/mia_scores.json"  # eval_before is shared between the runs
    cp "$src" "$HERE/smollm2-privacy/logs/$r/mia_scores_${e#eval_}.json"
  done
done
for r in target-before ga-uwc npo-uwc; do
  mkdir -p "$HERE/smollm2-privacy/logs/$r" && cp "$OUT/runs/$r/attacks.json" "$HERE/smollm2-privacy/logs/$r/"
done
cp "$OUT/runs/twin_mia_min_k.json" "$HERE/smollm2-privacy/logs/"
python "$HERE/smollm2_privacy_tables.py" --write
