#!/usr/bin/env bash
# Gradient matching, step 1 (the paper's recipe): full-gradient targets of the harmful anchors and of
# their two safe counterparts (first 10 response tokens each, examples cut at 480 tokens), then every
# pool example (the paper's own pools cut at its length: Alpaca 512, Dolly/GSM8K 2048; any other pool whole;
# see scripts/recipe_env.sh) scored against the three targets -> $OUT/scores/scores.csv (columns harmful,
# safe1, safe2; scripts/rank.sh METHOD=gradient combines them with weights 1 -1 -1). The model is prompted in
# its own template (TEMPLATE=paper: Llama-2's, the paper's). Every variable can be overridden from the
# environment, e.g. `MODEL=models/smollm2-135m-instruct POOL=my_pool.jsonl bash scripts/get_full_gradient.sh`.
# Data-parallel on one node: LAUNCH="torchrun --nproc_per_node 8". On a cluster, from the project root (the
# #SBATCH lines below are defaults; options on the sbatch line win):
#   MODEL=... POOL=... sbatch --array=0-7 scripts/get_full_gradient.sh
# Each array task builds the targets (the first builder writes them, the others wait and reuse them) and scores
# its shard of the pool (get_gradients.py reads SLURM_ARRAY_TASK_ID / _COUNT itself; a pool under 8 x 512
# examples needs EXTRA="--chunk_size <pool size / 8>" to give every task work); the last one to finish merges
# and prints the next command (rank.sh) as its last line. A killed run resumes where it stopped.
#
#SBATCH --job-name=safedata-grads
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G                   # host memory: the weights are read once (13.5 GB in bf16 for a 7B model)
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out  # relative to the directory sbatch runs in (the project root)
set -euo pipefail
# The project root: PROJECT_DIR, else this script's parent folder (bash scripts/...), else where sbatch ran
# (SLURM runs a copy of this script from its spool folder).
root=${PROJECT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
if [[ -z "${PROJECT_DIR:-}" && ! -f "$root/scripts/recipe_env.sh" ]]; then root=${SLURM_SUBMIT_DIR:-$root}; fi
cd "$root" 2>/dev/null && [[ -f scripts/recipe_env.sh ]] ||
  { echo "error: $root is not the project root; run sbatch there or set PROJECT_DIR" >&2; exit 2; }
source scripts/recipe_env.sh

LAUNCH=${LAUNCH:-$PYTHON}                 # e.g. "torchrun --nproc_per_node 8"
ANCHOR_MLEN=${ANCHOR_MLEN:-10}           # the paper: first 10 response tokens of each anchor
POOL_MLEN=${POOL_MLEN:-}                 # empty: the whole response (the paper)
PARAMS=${PARAMS:-all}                    # all (the paper) | linear
BATCH_SIZE=${BATCH_SIZE:-8}
OUT=${OUT:-$RUNS/gradients/$MODEL_NAME/${POOL_NAME}_${SETTINGS_TAG}_mlen${ANCHOR_MLEN}_$PARAMS}

require_files POOL HARMFUL SAFE1 SAFE2
describe_settings
common=(--model_name "$MODEL" "${template_flag[@]}" --batch_size "$BATCH_SIZE" --params "$PARAMS" "${quirks_flag[@]}")
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
# The task that finds every shard done merges (writes scores/meta.json last).
if [[ ! -f "$OUT/scores/meta.json" ]]; then
  echo "array task ${SLURM_ARRAY_TASK_ID:-?}: its shard of $OUT/scores is done; the last task to finish merges" \
       "and prints the next command"
  exit 0
fi
METHOD=gradient SCORES=$OUT/scores next_hint rank.sh METHOD SCORES
