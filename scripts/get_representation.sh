#!/usr/bin/env bash
# Representation matching, step 1: hidden-state features of the harmful anchors, (bi-directional) their
# safe counterparts, and the benign pool. Every example, anchor or pool, is read at its last token (the paper's
# own pools cut at its lengths: Alpaca 512, Dolly/GSM8K 2048, anchors 480; any other pool whole; see
# scripts/recipe_env.sh). The model is prompted in its own template (TEMPLATE=paper: Llama-2's, the paper's).
# Every variable can be overridden from the environment, e.g.
#   MODEL=models/smollm2-135m-instruct POOL=my_pool.jsonl bash scripts/get_representation.sh
#   REP_ANCHORS=harmful bash scripts/get_representation.sh          # the paper's recipe (no safe anchors)
# On a cluster, from the project root (the #SBATCH lines below are defaults; options on the sbatch line win):
#   MODEL=... POOL=... sbatch --array=0-7 scripts/get_representation.sh
# Each array task extracts its shard of the pool (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT; a pool under
# 8 x 512 examples needs EXTRA="--chunk_size <pool size / 8>" to give every task work), the first task the
# anchors too; the last task to finish merges and prints the next command (rank.sh) as its last line.
#
#SBATCH --job-name=safedata-reps
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G                   # host memory: the weights are read once (13.5 GB in bf16 for a 7B model)
#SBATCH --time=4:00:00
#SBATCH --output=logs/%x-%A_%a.out  # relative to the directory sbatch runs in (the project root)
set -euo pipefail
# The project root: PROJECT_DIR, else this script's parent folder (bash scripts/...), else where sbatch ran
# (SLURM runs a copy of this script from its spool folder).
root=${PROJECT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
if [[ -z "${PROJECT_DIR:-}" && ! -f "$root/scripts/recipe_env.sh" ]]; then root=${SLURM_SUBMIT_DIR:-$root}; fi
cd "$root" 2>/dev/null && [[ -f scripts/recipe_env.sh ]] ||
  { echo "error: $root is not the project root; run sbatch there or set PROJECT_DIR" >&2; exit 2; }
source scripts/recipe_env.sh

REP_ANCHORS=${REP_ANCHORS:-bidirectional}  # bidirectional: harmful +1, safe -1 (ours) | harmful: max cosine to harmful only (the paper)
BATCH_SIZE=${BATCH_SIZE:-16}
OUT=${OUT:-$RUNS/reps/$MODEL_NAME/${POOL_NAME}_$SETTINGS_TAG}

case "$REP_ANCHORS" in
  bidirectional) anchor_sets=(harmful:"$HARMFUL" safe1:"$SAFE1" safe2:"$SAFE2") ;;
  harmful) anchor_sets=(harmful:"$HARMFUL") ;;
  *) echo "error: REP_ANCHORS=$REP_ANCHORS: choose bidirectional or harmful" >&2; exit 2 ;;
esac

if [[ "$REP_ANCHORS" == harmful ]]; then require_files POOL HARMFUL; else require_files POOL HARMFUL SAFE1 SAFE2; fi
describe_settings
common=(--model_name "$MODEL" "${template_flag[@]}" --batch_size "$BATCH_SIZE" "${quirks_flag[@]}")
# Anchors are tiny: only the first array task (or a plain run) extracts them, before its shard of the pool, so
# the merge (which needs that shard) comes after them whichever task runs it. No other task reads them.
if [[ "${SLURM_ARRAY_TASK_ID:-0}" == "${SLURM_ARRAY_TASK_MIN:-0}" ]]; then
  for entry in "${anchor_sets[@]}"; do
    $PYTHON get_representation.py "${common[@]}" --data_path "${entry#*:}" --output_dir "$OUT/${entry%%:*}" \
      "${anchor_cut[@]}" --shard 0/1 $EXTRA
  done
fi
# The pool: get_representation.py takes its shard from SLURM_ARRAY_TASK_ID / _COUNT itself; the task that finds
# every shard done merges (writes pool/meta.json last).
$PYTHON get_representation.py "${common[@]}" --data_path "$POOL" --output_dir "$OUT/pool" "${pool_cut[@]}" $EXTRA
if [[ ! -f "$OUT/pool/meta.json" ]]; then
  echo "array task ${SLURM_ARRAY_TASK_ID:-?}: its shard of $OUT/pool is done; the last task to finish merges" \
       "and prints the next command"
  exit 0
fi
METHOD=reps REPS=$OUT next_hint rank.sh METHOD REPS REP_ANCHORS
