#!/usr/bin/env bash
# Step 2: rank the pool and write the top-k and bottom-k subsets (bi-directional anchoring,
# weights 1 -1 -1). METHOD=reps ranks representation features; METHOD=gradient ranks the
# score dir written by scripts/get_full_gradient.sh. Variables are overridable from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-meta-llama/Llama-2-7b-chat-hf}
METHOD=${METHOD:-reps}                    # reps | gradient
DATA_DIR=${DATA_DIR:-ft_datasets/data}
POOL=${POOL:-$DATA_DIR/alpaca_data_no_safety.json}
WEIGHTS=${WEIGHTS:-"1 -1 -1"}
AVG_N=${AVG_N:-1}                         # 1 = max cosine per anchor set (paper); all = mean
K=${K:-100}
TYPES=${TYPES:-"top bottom"}
NAME=${NAME:-$(basename "${POOL%.*}")}
REPS=${REPS:-runs/reps/$(basename "$MODEL")}
SCORES=${SCORES:-runs/gradients/$(basename "$MODEL")/scores}
WRITE_TO=${WRITE_TO:-runs/selections/$METHOD}

for type in $TYPES; do
  if [[ "$METHOD" == "reps" ]]; then
    $PYTHON rank.py --data_path "$POOL" --pool_features "$REPS/pool" \
      --anchor_features "$REPS/harmful" "$REPS/safe1" "$REPS/safe2" \
      --weights $WEIGHTS --avg_n "$AVG_N" --type "$type" --k "$K" --write_to "$WRITE_TO" --name "$NAME"
  else
    $PYTHON rank.py --data_path "$POOL" --scores "$SCORES" --weights $WEIGHTS \
      --type "$type" --k "$K" --write_to "$WRITE_TO" --name "$NAME"
  fi
done
