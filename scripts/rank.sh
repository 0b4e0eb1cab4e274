#!/usr/bin/env bash
# Step 2: rank the pool and write the top-k and bottom-k subsets (and random-k controls). METHOD=reps ranks the
# features of scripts/get_representation.sh (REP_ANCHORS=bidirectional: weights 1 -1 -1, ours; REP_ANCHORS=harmful:
# the maximum cosine to the harmful anchors alone, the paper's); METHOD=gradient ranks the score dir of
# scripts/get_full_gradient.sh (weights 1 -1 -1, the paper's). Give the same variables (MODEL, TEMPLATE, POOL,
# lengths, ...) as the step-1 script: its last line is this command with them.
# TYPES="top bottom random": random writes one random-K subset per seed in RANDOM_SEEDS (score.py --method
# random --seed S, then its top K: a uniformly random K-subset, the same for every method and model).
# The last lines printed are the fine-tuning jobs, one per subset, to run as printed from the project root (the
# last one is the top-K job): MODEL=... TEMPLATE=... SUBSET=... SAVE_NAME=... OUTPUT_ROOT=... sbatch
# finetune_evaluation.slurm, with TEMPLATE the one step 1 recorded in its meta.json.
# rank.py's summaries go to stderr, so stdout holds the lines to act on. No GPU needed; under sbatch (from the
# project root) the lines below are its defaults.
#
#SBATCH --job-name=safedata-rank
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=16G
#SBATCH --time=1:00:00
#SBATCH --output=logs/%x-%j.out     # relative to the directory sbatch runs in (the project root)
set -euo pipefail
# The project root: PROJECT_DIR, else this script's parent folder (bash scripts/...), else where sbatch ran
# (SLURM runs a copy of this script from its spool folder).
root=${PROJECT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
if [[ -z "${PROJECT_DIR:-}" && ! -f "$root/scripts/recipe_env.sh" ]]; then root=${SLURM_SUBMIT_DIR:-$root}; fi
cd "$root" 2>/dev/null && [[ -f scripts/recipe_env.sh ]] ||
  { echo "error: $root is not the project root; run sbatch there or set PROJECT_DIR" >&2; exit 2; }
source scripts/recipe_env.sh
require_files POOL

METHOD=${METHOD:-reps}                    # reps | gradient
REP_ANCHORS=${REP_ANCHORS:-bidirectional} # reps only: bidirectional (ours) | harmful (the paper)
ANCHOR_MLEN=${ANCHOR_MLEN:-10}
PARAMS=${PARAMS:-all}
AVG_N=${AVG_N:-1}                         # 1 = max cosine per anchor set (paper); all = mean
K=${K:-100}
TYPES=${TYPES:-"top bottom"}              # any of top, bottom, random
RANDOM_SEEDS=${RANDOM_SEEDS:-1}           # TYPES with random: one random-K subset per seed
NAME=${NAME:-$POOL_NAME}
REPS=${REPS:-$RUNS/reps/$MODEL_NAME/${POOL_NAME}_$SETTINGS_TAG}
SCORES=${SCORES:-$RUNS/gradients/$MODEL_NAME/${POOL_NAME}_${SETTINGS_TAG}_mlen${ANCHOR_MLEN}_$PARAMS/scores}

case "$METHOD:$REP_ANCHORS" in
  reps:bidirectional) anchors=("$REPS/harmful" "$REPS/safe1" "$REPS/safe2"); default_weights="1 -1 -1"
    tag=reps; source_dir=$REPS/pool ;;
  reps:harmful) anchors=("$REPS/harmful"); default_weights="1"; tag=reps-harmful; source_dir=$REPS/pool ;;
  gradient:*) default_weights="1 -1 -1"; tag=gradient; source_dir=$SCORES ;;
  *) echo "error: METHOD=$METHOD REP_ANCHORS=$REP_ANCHORS: choose METHOD reps|gradient, REP_ANCHORS bidirectional|harmful" >&2
     exit 2 ;;
esac
for type in $TYPES; do
  case "$type" in
    top|bottom|random) ;;
    *) echo "error: TYPES=$TYPES: $type is not one of top, bottom, random" >&2; exit 2 ;;
  esac
done
WEIGHTS=${WEIGHTS:-$default_weights}
WRITE_TO=${WRITE_TO:-$RUNS/selections/$tag/$MODEL_NAME/${POOL_NAME}_$SETTINGS_TAG}

# The template the features / scores were computed with (their meta.json): the fine-tune prompts the same way.
if [[ ! -f "$source_dir/meta.json" ]]; then
  echo "error: $source_dir/meta.json: no such file; run step 1 first (scripts/get_representation.sh or" \
       "scripts/get_full_gradient.sh; under an array, its last task writes it) and pass the variables it printed" >&2
  exit 2
fi
FT_TEMPLATE=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["template"])' "$source_dir/meta.json")

ext=$([[ "${POOL,,}" == *.jsonl ]] && echo jsonl || echo json)   # what rank.py writes: the pool's own JSON kind
jobs=()       # one fine-tuning job per subset written: the controls first, the top-K job last
top_job=""
job_line() {  # job_line SUBSET SAVE_NAME: the finetune_evaluation.slurm command for one subset
  printf 'MODEL=%q TEMPLATE=%q SUBSET=%q SAVE_NAME=%q OUTPUT_ROOT=%q sbatch finetune_evaluation.slurm' \
    "$MODEL" "$FT_TEMPLATE" "$1" "$2" "$RUNS/finetune"
}
for type in $TYPES; do
  if [[ "$type" == random ]]; then
    for seed in $RANDOM_SEEDS; do
      random_scores=$RUNS/scores/random/${POOL_NAME}_seed$seed
      $PYTHON score.py --method random --data_path "$POOL" --seed "$seed" --output_dir "$random_scores" >&2
      $PYTHON rank.py --data_path "$POOL" --scores "$random_scores" --weights 1 --type top --k "$K" \
        --output_dir "$WRITE_TO" --name "${NAME}_random_seed$seed" >&2
      jobs+=("$(job_line "$WRITE_TO/${NAME}_random_seed${seed}_top$K.$ext" \
                         "random_${MODEL_NAME}_${NAME}_random${K}_seed$seed")")
    done
    continue
  fi
  if [[ "$METHOD" == "reps" ]]; then
    $PYTHON rank.py --data_path "$POOL" --pool_features "$REPS/pool" --anchor_features "${anchors[@]}" \
      --weights $WEIGHTS --avg_n "$AVG_N" --type "$type" --k "$K" --output_dir "$WRITE_TO" --name "$NAME" >&2
  else
    $PYTHON rank.py --data_path "$POOL" --scores "$SCORES" --weights $WEIGHTS \
      --type "$type" --k "$K" --output_dir "$WRITE_TO" --name "$NAME" >&2
  fi
  line=$(job_line "$WRITE_TO/${NAME}_$type$K.$ext" "${tag}_${MODEL_NAME}_${NAME}_$type$K")
  if [[ "$type" == top ]]; then top_job=$line; else jobs+=("$line"); fi
done
if [[ -n "$top_job" ]]; then jobs+=("$top_job"); fi
echo "selections in $WRITE_TO; next, fine-tune and evaluate each subset (from the project root):"
printf '%s\n' "${jobs[@]}"
