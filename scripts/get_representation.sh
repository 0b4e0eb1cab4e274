#!/usr/bin/env bash
# Representation matching, step 1: hidden-state features of the harmful anchors, (bi-directional) their
# safe counterparts, and the benign pool. Every example, anchor or pool, is read at its last token (cut
# at the paper's lengths: Alpaca 512, Dolly/GSM8K 2048, anchors 480; see scripts/recipe_env.sh).
# Every variable can be overridden from the environment, e.g.
#   MODEL=mistralai/Mistral-7B-Instruct-v0.2 TEMPLATE=chat bash scripts/get_representation.sh
#   REP_ANCHORS=harmful bash scripts/get_representation.sh          # the paper's recipe (no safe anchors)
# Under a SLURM array (sbatch --array=0-7 ...) each task extracts its shard of the pool; the last one merges.
set -euo pipefail
cd "$(dirname "$0")/.."
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
common=(--model_name "$MODEL" --template "$TEMPLATE" --batch_size "$BATCH_SIZE" "${quirks_flag[@]}")
# Anchors are tiny: only the first array task (or a plain run) extracts them.
if [[ "${SLURM_ARRAY_TASK_ID:-0}" == "${SLURM_ARRAY_TASK_MIN:-0}" ]]; then
  for entry in "${anchor_sets[@]}"; do
    $PYTHON get_representation.py "${common[@]}" --data_path "${entry#*:}" --output_dir "$OUT/${entry%%:*}" \
      "${anchor_cut[@]}" --shard 0/1 $EXTRA
  done
fi
$PYTHON get_representation.py "${common[@]}" --data_path "$POOL" --output_dir "$OUT/pool" "${pool_cut[@]}" $EXTRA
METHOD=reps REPS=$OUT next_hint rank.sh METHOD REPS REP_ANCHORS
