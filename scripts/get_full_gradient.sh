#!/usr/bin/env bash
# Gradient matching, step 1 (the paper's recipe): full-gradient targets of the harmful anchors and of
# their two safe counterparts (first 10 response tokens each, examples cut at 480 tokens), then every
# pool example (cut at the paper's length: Alpaca 512, Dolly/GSM8K 2048; see scripts/recipe_env.sh)
# scored against the three targets -> $OUT/scores/scores.csv (columns harmful, safe1, safe2;
# scripts/rank.sh METHOD=gradient combines them with weights 1 -1 -1). Every variable can be overridden
# from the environment, e.g. `MODEL=mistralai/Mistral-7B-Instruct-v0.2 TEMPLATE=chat bash scripts/get_full_gradient.sh`.
# Data-parallel on one node: LAUNCH="torchrun --nproc_per_node 8". Under a SLURM array
# (sbatch --array=0-7 ...) each task scores its shard of the pool (get_gradients.py reads
# SLURM_ARRAY_TASK_ID itself); the last one to finish merges. A killed run resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/recipe_env.sh

LAUNCH=${LAUNCH:-$PYTHON}                 # e.g. "torchrun --nproc_per_node 8"
ANCHOR_MLEN=${ANCHOR_MLEN:-10}           # the paper: first 10 response tokens of each anchor
POOL_MLEN=${POOL_MLEN:-}                 # empty: the whole response (the paper)
PARAMS=${PARAMS:-all}                    # all (the paper) | linear
BATCH_SIZE=${BATCH_SIZE:-8}
OUT=${OUT:-$RUNS/gradients/$MODEL_NAME/${POOL_NAME}_${SETTINGS_TAG}_mlen${ANCHOR_MLEN}_$PARAMS}

require_files POOL HARMFUL SAFE1 SAFE2
common=(--model_name "$MODEL" --template "$TEMPLATE" --batch_size "$BATCH_SIZE" --params "$PARAMS" "${quirks_flag[@]}")
# Anchors are tiny (10 examples each); a target already built with the same settings is kept, so every
# array task can run these three lines (concurrent builders wait for the first).
for entry in harmful:"$HARMFUL" safe1:"$SAFE1" safe2:"$SAFE2"; do
  $PYTHON get_gradients.py --anchor "${common[@]}" --data_path "${entry#*:}" --output_dir "$OUT/${entry%%:*}" \
    "${anchor_cut[@]}" --max_response_length "$ANCHOR_MLEN" $EXTRA
done
pool_mlen=()
if [[ -n "$POOL_MLEN" ]]; then pool_mlen=(--max_response_length "$POOL_MLEN"); fi
$LAUNCH get_gradients.py "${common[@]}" --data_path "$POOL" --output_dir "$OUT/scores" "${pool_cut[@]}" \
  --targets "$OUT/harmful" "$OUT/safe1" "$OUT/safe2" --target_names harmful safe1 safe2 "${pool_mlen[@]}" $EXTRA
METHOD=gradient SCORES=$OUT/scores next_hint rank.sh METHOD SCORES
