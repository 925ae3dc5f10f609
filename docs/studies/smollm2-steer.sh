#!/usr/bin/env bash
# Reproduces docs/studies/smollm2-steer.md on a CPU: GA and NPO on the SmolLM2 study's fine-tuned
# target, plain, stopped on predicted retain damage, with GD, and with GD and GRU's conflict-free
# update (it needs GD's retain gradient, so GD alone is its baseline); UWC in every run; GA's first
# two steps again with the second-order term. About 3 hours on 2 cores, two runs side by side.
# Needs the fine-tuned target of docs/studies/smollm2-tofu.sh (step 1) in $FT.
# Usage: TOFU=path/to/tofu FT=study/ft OUT=steer bash docs/studies/smollm2-steer.sh [spec ...]
set -euo pipefail
TOFU=${TOFU:?set TOFU to a folder of TOFU JSON-lines files}
FT=${FT:?set FT to the fine-tune output folder (FT/target)}
OUT=${OUT:-steer}
STOP_X=${STOP_X:-0.25}
SO_STEPS=${SO_STEPS:-2}
mkdir -p "$OUT"
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(ga-none npo-none ga-stop npo-stop ga-gd ga-gd-gru npo-gd npo-gd-gru ga-so)
for spec in "${specs[@]}"; do
  IFS=- read -r method reg extra <<< "$spec"
  case "$reg" in stop|so) reg=none ;; esac
  flags=()
  case "$spec" in
    *-stop) flags=(--stop-at-retain-damage "$STOP_X") ;;
    # the guard comparison is read off the metrics: no G-effects there, which halves a step's cost
    *-gd) flags=(--geffect-every 0) ;;
    *-gru) flags=(--geffect-guard gru --geffect-every 0) ;;
    # the second-order term (a double backward per risk, ~10x a plain step on this CPU) on the
    # first SO_STEPS steps of the plain run's trajectory: the term measures, it does not steer
    *-so) flags=(--second-order --stop-at-step "$SO_STEPS") ;;
  esac
  run="$OUT/runs/$spec"
  [ -f "$run/summary.md" ] && continue
  [[ "$spec" == *-so && -d "$run" ]] && continue  # measured once, stopped on purpose
  resume=()
  [ -f "$run/config.json" ] && resume=(--resume)  # an interrupted run continues where it stopped
  /usr/bin/time -v python -m fastgeffect.run --model "$FT/target" \
      --data-dir "$TOFU" --authors 10 --max-length 160 --method "$method" --regularizer "$reg" \
      --epochs 3 --batch-size 4 --lr 5e-5 --geffect-batch 8 --eval-size 10 --eval-batch-size 10 \
      --ps-protocol clean --pg-steps "" --shared-dir "$OUT/artefacts" --no-progress --out "$run" \
      "${flags[@]}" "${resume[@]}" 2>> "$OUT/$spec.time"
done

# the logs the document's tables are built from (docs/studies/smollm2_steer_tables.py), copied next
# to it: LOGS=docs/studies/smollm2-steer bash docs/studies/smollm2-steer.sh
if [ -n "${LOGS:-}" ]; then
  for run in "$OUT"/runs/*/; do
    dest="$LOGS/logs/$(basename "$run")"
    mkdir -p "$dest"
    for f in config.json timing.json geffect.jsonl train_log.jsonl metrics_before.json metrics_after.json \
             metrics_uwc.json; do
      [ -f "$run/$f" ] && cp "$run/$f" "$dest/"
    done
  done
fi
