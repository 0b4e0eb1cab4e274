#!/usr/bin/env bash
# Step 2: rank the pool and write the top-k and bottom-k subsets. METHOD=reps ranks the features of
# scripts/get_representation.sh (REP_ANCHORS=bidirectional: weights 1 -1 -1, ours; REP_ANCHORS=harmful:
# the maximum cosine to the harmful anchors alone, the paper's); METHOD=gradient ranks the score dir of
# scripts/get_full_gradient.sh (weights 1 -1 -1, the paper's). Give the same variables (MODEL, POOL,
# lengths, ...) as the step-1 script: its last line prints this command with them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/recipe_env.sh
require_files POOL

METHOD=${METHOD:-reps}                    # reps | gradient
REP_ANCHORS=${REP_ANCHORS:-bidirectional} # reps only: bidirectional (ours) | harmful (the paper)
ANCHOR_MLEN=${ANCHOR_MLEN:-10}
PARAMS=${PARAMS:-all}
AVG_N=${AVG_N:-1}                         # 1 = max cosine per anchor set (paper); all = mean
K=${K:-100}
TYPES=${TYPES:-"top bottom"}
NAME=${NAME:-$POOL_NAME}
REPS=${REPS:-$RUNS/reps/$MODEL_NAME/${POOL_NAME}_$SETTINGS_TAG}
SCORES=${SCORES:-$RUNS/gradients/$MODEL_NAME/${POOL_NAME}_${SETTINGS_TAG}_mlen${ANCHOR_MLEN}_$PARAMS/scores}

case "$METHOD:$REP_ANCHORS" in
  reps:bidirectional) anchors=("$REPS/harmful" "$REPS/safe1" "$REPS/safe2"); default_weights="1 -1 -1"
    tag=reps ;;
  reps:harmful) anchors=("$REPS/harmful"); default_weights="1"; tag=reps-harmful ;;
  gradient:*) default_weights="1 -1 -1"; tag=gradient ;;
  *) echo "error: METHOD=$METHOD REP_ANCHORS=$REP_ANCHORS: choose METHOD reps|gradient, REP_ANCHORS bidirectional|harmful" >&2
     exit 2 ;;
esac
WEIGHTS=${WEIGHTS:-$default_weights}
WRITE_TO=${WRITE_TO:-$RUNS/selections/$tag/$MODEL_NAME/${POOL_NAME}_$SETTINGS_TAG}

for type in $TYPES; do
  if [[ "$METHOD" == "reps" ]]; then
    $PYTHON rank.py --data_path "$POOL" --pool_features "$REPS/pool" --anchor_features "${anchors[@]}" \
      --weights $WEIGHTS --avg_n "$AVG_N" --type "$type" --k "$K" --write_to "$WRITE_TO" --name "$NAME"
  else
    $PYTHON rank.py --data_path "$POOL" --scores "$SCORES" --weights $WEIGHTS \
      --type "$type" --k "$K" --write_to "$WRITE_TO" --name "$NAME"
  fi
done
ext=$([[ "${POOL##*.}" == jsonl ]] && echo jsonl || echo json)
echo "selections in $WRITE_TO; next: SUBSET=$WRITE_TO/${NAME}_top$K.$ext SAVE_NAME=... sbatch finetune_evaluation.slurm"
