#!/usr/bin/env bash
# Representation matching, step 1: hidden-state features of the harmful anchors, their safe
# counterparts and the benign pool (the paper's recipe). Every variable can be overridden from
# the environment, e.g. `MODEL=mistralai/Mistral-7B-Instruct-v0.2 TEMPLATE=chat bash scripts/get_representation.sh`.
# Under a SLURM array (sbatch --array=0-7 ...) each task extracts its shard of the pool; the last one merges.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-meta-llama/Llama-2-7b-chat-hf}
TEMPLATE=${TEMPLATE:-paper}
DATA_DIR=${DATA_DIR:-ft_datasets/data}
POOL=${POOL:-$DATA_DIR/alpaca_data_no_safety.json}
HARMFUL=${HARMFUL:-$DATA_DIR/pure-bad-illegal-activities-selected10.jsonl}
SAFE1=${SAFE1:-$DATA_DIR/pure-bad-illegal-acticities-selected-10-anchor1.jsonl}
SAFE2=${SAFE2:-$DATA_DIR/pure-bad-illegal-activities-selected-10-anchor2.jsonl}
ANCHOR_MLEN=${ANCHOR_MLEN:-10}           # the paper: first 10 response tokens of each anchor
BATCH_SIZE=${BATCH_SIZE:-16}
OUT=${OUT:-runs/reps/$(basename "$MODEL")}
EXTRA=${EXTRA:-}                          # e.g. "--dtype fp32 --skip_bad"

common=(--model_name "$MODEL" --template "$TEMPLATE" --batch_size "$BATCH_SIZE")
# Anchors are tiny: only the first array task (or a plain run) extracts them.
if [[ "${SLURM_ARRAY_TASK_ID:-0}" == "${SLURM_ARRAY_TASK_MIN:-0}" ]]; then
  $PYTHON get_representation.py "${common[@]}" --data_path "$HARMFUL" --output_dir "$OUT/harmful" --max_response_length "$ANCHOR_MLEN" --shard 0/1 $EXTRA
  $PYTHON get_representation.py "${common[@]}" --data_path "$SAFE1" --output_dir "$OUT/safe1" --max_response_length "$ANCHOR_MLEN" --shard 0/1 $EXTRA
  $PYTHON get_representation.py "${common[@]}" --data_path "$SAFE2" --output_dir "$OUT/safe2" --max_response_length "$ANCHOR_MLEN" --shard 0/1 $EXTRA
fi
$PYTHON get_representation.py "${common[@]}" --data_path "$POOL" --output_dir "$OUT/pool" $EXTRA
