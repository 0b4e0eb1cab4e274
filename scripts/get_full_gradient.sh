#!/usr/bin/env bash
# Gradient matching, step 1 (the paper's recipe): full-gradient targets of the harmful anchors and of
# their two safe counterparts (first 10 response tokens each), then every pool example scored against
# the three targets -> $OUT/scores/scores.csv (columns harmful, safe1, safe2; rank.py / scripts/rank.sh
# METHOD=gradient combine them with weights 1 -1 -1). Every variable can be overridden from the
# environment, e.g. `MODEL=mistralai/Mistral-7B-Instruct-v0.2 TEMPLATE=chat bash scripts/get_full_gradient.sh`.
# Data-parallel on one node: LAUNCH="torchrun --nproc_per_node 8". Under a SLURM array
# (sbatch --array=0-7 ...) each task scores its shard of the pool (get_gradients.py reads
# SLURM_ARRAY_TASK_ID itself); the last one to finish merges. A killed run resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}                 # e.g. "torchrun --nproc_per_node 8"
MODEL=${MODEL:-meta-llama/Llama-2-7b-chat-hf}
TEMPLATE=${TEMPLATE:-paper}
DATA_DIR=${DATA_DIR:-ft_datasets/data}
POOL=${POOL:-$DATA_DIR/alpaca_data_no_safety.json}
HARMFUL=${HARMFUL:-$DATA_DIR/pure-bad-illegal-activities-selected10.jsonl}
SAFE1=${SAFE1:-$DATA_DIR/pure-bad-illegal-acticities-selected-10-anchor1.jsonl}   # (sic) the paper's file name
SAFE2=${SAFE2:-$DATA_DIR/pure-bad-illegal-activities-selected-10-anchor2.jsonl}
ANCHOR_MLEN=${ANCHOR_MLEN:-10}           # the paper: first 10 response tokens of each anchor
POOL_MLEN=${POOL_MLEN:-}                 # empty: the whole response (the paper)
PARAMS=${PARAMS:-all}                    # all (the paper) | linear
BATCH_SIZE=${BATCH_SIZE:-8}
OUT=${OUT:-runs/gradients/$(basename "$MODEL")}
EXTRA=${EXTRA:-}                          # e.g. "--dtype fp32 --skip_bad"

common=(--model_name "$MODEL" --template "$TEMPLATE" --batch_size "$BATCH_SIZE" --params "$PARAMS")
# Anchors are tiny (10 examples each); a target that is already built is kept, so every array task
# can safely run these three lines (the first one builds, the others find them done or build the same bytes).
$PYTHON get_gradients.py --anchor "${common[@]}" --data_path "$HARMFUL" --output_dir "$OUT/harmful" --max_response_length "$ANCHOR_MLEN" $EXTRA
$PYTHON get_gradients.py --anchor "${common[@]}" --data_path "$SAFE1" --output_dir "$OUT/safe1" --max_response_length "$ANCHOR_MLEN" $EXTRA
$PYTHON get_gradients.py --anchor "${common[@]}" --data_path "$SAFE2" --output_dir "$OUT/safe2" --max_response_length "$ANCHOR_MLEN" $EXTRA
pool_mlen=()
if [[ -n "$POOL_MLEN" ]]; then pool_mlen=(--max_response_length "$POOL_MLEN"); fi
$LAUNCH get_gradients.py "${common[@]}" --data_path "$POOL" --output_dir "$OUT/scores" \
  --targets "$OUT/harmful" "$OUT/safe1" "$OUT/safe2" --target_names harmful safe1 safe2 "${pool_mlen[@]}" $EXTRA
echo "next: METHOD=gradient SCORES=$OUT/scores bash scripts/rank.sh"
