#!/usr/bin/env bash
# The mini safety lab (docs/LAB.md): the paper's experiment, end to end, on 2 CPU cores.
#
# The committed aligned lab model ($MODEL) refuses held-out harmful-style requests. The tool ranks the benign
# pool against anchors (bi-directional: +1 harmful compliant anchors, -1 and -1 two sets of safe refusals):
#   gradient matching        get_gradients.py --anchor (x3) + --targets (pool scores) -> rank.py --scores
#   representation matching  get_representation.py (pool + anchors)                   -> rank.py --pool_features
# and writes the top-K and bottom-K subsets of each, plus a random-K subset per seed (lab_report.py random).
# The aligned model is fine-tuned on each subset with each seed (finetune.py), answers the held-out prompts
# (generate.py, greedy), is scored (evaluate.py: keyword ASR), and lab_report.py report prints the table
# (mean ± sd over seeds; compliance, keyword ASR, held-out compliant-answer loss; each subset's composition),
# PASS/FAIL lines for the expected orderings, and writes PNG plots. Everything goes to $OUT (git-ignored).
#
#   make demo                       # = PYTHON=.venv/bin/python bash scripts/demo.sh
#   SEEDS="1" METHODS=grad bash scripts/demo.sh     # quicker, one seed, gradients only
#   FORCE=1 bash scripts/demo.sh    # start again (otherwise finished steps are kept and skipped)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-ft_datasets/lab}
MODEL=${MODEL:-$DATA/model}                 # the aligned lab model (scripts/make_lab_model.sh)
POOL=${POOL:-$DATA/pool.json}
ANCHORS=${ANCHORS:-"anchors_harmful anchors_safe anchors_safe2"}   # files in $DATA (.jsonl), weights below
WEIGHTS=${WEIGHTS:-"1 -1 -1"}
OUT=${OUT:-runs/demo}
K=${K:-100}
SEEDS=${SEEDS:-"1 2 3"}
METHODS=${METHODS:-"grad reps"}
TEMPLATE=${TEMPLATE:-chat}                  # the lab model's template (short prompts)
ANCHOR_MLENS=${ANCHOR_MLENS:-10}            # gradient anchors: first 10 response tokens (the paper's mlens10)
LR=${LR:-1e-3}                              # the lab's fine-tuning lr (the paper's 5e-5 is for 7B)
EPOCHS=${EPOCHS:-5}                         # the paper: 5 epochs, batch 20, lr x 0.85 per epoch
BATCH=${BATCH:-20}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-48}
FORCE=${FORCE:-0}
COST_DIR=""
JOBS=${JOBS:-2}                             # fine-tuning runs at a time (one per core)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # per process: a 1.6M model runs faster on 1 thread than on 2

[ -f "$MODEL/model.safetensors" ] || { echo "error: $MODEL: no model (bash scripts/make_lab_model.sh makes it)" >&2; exit 2; }
[ -f "$POOL" ] || { echo "error: $POOL missing (python ft_datasets/lab/make_lab_data.py writes the lab data)" >&2; exit 2; }
[ "$FORCE" = 1 ] && rm -rf "$OUT"
mkdir -p "$OUT/logs"
NAME=$(basename "$POOL"); NAME=${NAME%.*}
T0=$(date +%s)

# ---------------------------------------------------------------------------- progress
GROUPS_FT=()
for m in $METHODS; do
  case "$m" in grad|reps) GROUPS_FT+=("$m-top" "$m-bottom");; *) GROUPS_FT+=("$m-top");; esac
done
GROUPS_FT+=(random)
N_SEEDS=$(wc -w <<<"$SEEDS")
TOTAL=$(( ${#GROUPS_FT[@]} * N_SEEDS + 2 + $(wc -w <<<"$METHODS") ))
PROGRESS="$OUT/logs/progress"; : >"$PROGRESS"
tick() { echo "$1" >>"$PROGRESS"; }
bar() {  # bar "what": one progress line with a bar, the steps done and the elapsed time
  local DONE; DONE=$(wc -l <"$PROGRESS")
  local width=30 filled=$(( DONE * 30 / TOTAL )) el=$(( $(date +%s) - T0 ))
  printf '[%s%s] %2d/%d  %3dm%02ds  %s\n' "$(printf '%*s' "$filled" '' | tr ' ' '#')" \
    "$(printf '%*s' $(( width - filled )) '' | tr ' ' '.')" "$DONE" "$TOTAL" $(( el / 60 )) $(( el % 60 )) "$1"
}
source scripts/lab_steps.sh   # step, answer, finetune_and_answer

echo "mini safety lab: model $MODEL, pool $POOL, k=$K, seeds [$SEEDS], methods [$METHODS], lr $LR x $EPOCHS epochs -> $OUT"

# ---------------------------------------------------------------------------- 1. selection
ANCHOR_DIRS_REPS=(); ANCHOR_DIRS_GRAD=(); ANCHOR_FILES=(); HARMFUL_ONLY=()
for a in $ANCHORS; do
  ANCHOR_DIRS_REPS+=("$OUT/features/$a"); ANCHOR_DIRS_GRAD+=("$OUT/grad/targets/$a"); ANCHOR_FILES+=("$DATA/$a.jsonl")
  HARMFUL_ONLY+=($([ ${#HARMFUL_ONLY[@]} = 0 ] && echo 1 || echo 0))   # weights 1 0 0: the harmful anchors only
done
score_method() {  # score_method NAME SCORE_DIR WEIGHTS CMD...: CMD writes SCORE_DIR (kept when done), then rank top-K
  local name=$1 dir=$2 weights=$3; shift 3
  [ -f "$dir/scores.csv" ] || step "$name.score" "$@" --output_dir "$dir"
  step "$name.rank_top" "$PYTHON" rank.py --data_path "$POOL" --scores "$dir" --weights $weights --type top --k "$K" \
    --output_dir "$OUT/selections/$name"
}
for method in $METHODS; do
  [ "${COSTS:-0}" = 1 ] && COST_DIR="$OUT/costs/$method"   # scripts/lab_methods.sh: each selection step timed
  if [ "$method" = reps ]; then
    bar "representation matching: features of the pool and the anchors, rank top/bottom-$K"
    [ -f "$OUT/features/pool/features.safetensors" ] || step reps.pool "$PYTHON" get_representation.py \
      --model_name "$MODEL" --data_path "$POOL" --output_dir "$OUT/features/pool" --template "$TEMPLATE" --batch_size 32
    for a in $ANCHORS; do
      [ -f "$OUT/features/$a/features.safetensors" ] || step "reps.$a" "$PYTHON" get_representation.py \
        --model_name "$MODEL" --data_path "$DATA/$a.jsonl" --output_dir "$OUT/features/$a" --template "$TEMPLATE"
    done
    for type in top bottom; do
      step "reps.rank_$type" "$PYTHON" rank.py --data_path "$POOL" --pool_features "$OUT/features/pool" \
        --anchor_features "${ANCHOR_DIRS_REPS[@]}" --weights $WEIGHTS --type $type --k "$K" --output_dir "$OUT/selections/reps"
    done
  elif [ "$method" = grad ]; then
    if [ ! -f get_gradients.py ]; then
      echo "!! STEP NOT RUN: gradient selection needs get_gradients.py (not in this checkout yet); METHODS=reps to skip" >&2
      exit 3
    fi
    bar "gradient matching: anchor targets (first $ANCHOR_MLENS response tokens), exact pool scores, rank top/bottom-$K"
    for a in $ANCHORS; do
      [ -f "$OUT/grad/targets/$a/target.safetensors" ] || step "grad.$a" "$PYTHON" get_gradients.py --anchor \
        --model_name "$MODEL" --data_path "$DATA/$a.jsonl" --output_dir "$OUT/grad/targets/$a" --template "$TEMPLATE" \
        --max_response_length "$ANCHOR_MLENS" --batch_size 16
    done
    [ -f "$OUT/grad/scores/scores.csv" ] || step grad.scores "$PYTHON" get_gradients.py \
      --targets "${ANCHOR_DIRS_GRAD[@]}" --model_name "$MODEL" --data_path "$POOL" --output_dir "$OUT/grad/scores" \
      --template "$TEMPLATE" --batch_size 16
    for type in top bottom; do
      step "grad.rank_$type" "$PYTHON" rank.py --data_path "$POOL" --scores "$OUT/grad/scores" --weights $WEIGHTS \
        --type $type --k "$K" --output_dir "$OUT/selections/grad"
    done
  else
    bar "$method: score the pool (score.py), rank top-$K"
    case "$method" in
      selfinf|selfinfn)  # anchor-free: one score dir, columns self_inf and self_inf_n
        score_method "$method" "$OUT/scores/selfinf" "$([ "$method" = selfinf ] && echo 1 0 || echo 0 1)" \
          "$PYTHON" get_gradients.py --self_influence --model_name "$MODEL" --data_path "$POOL" --template "$TEMPLATE" \
          --batch_size 16;;
      *) score_spec "$method" || { echo "error: METHODS: unknown method '$method' (grad, reps, bm25[_harmful], embedding[_harmful], lists, length, compliance, selfinf[n])" >&2
           exit 2; }
         score_method "$method" "$OUT/scores/$SCORE_KEY" "$SCORE_WEIGHTS" "$PYTHON" score.py --data_path "$POOL" \
           "${SCORE_ARGS[@]}";;
    esac
  fi
  COST_DIR=""
  tick "$method"
done

bar "random-$K subsets, one draw per seed"
for seed in $SEEDS; do
  step "random.seed$seed" "$PYTHON" lab_report.py random --data_path "$POOL" --k "$K" --seed "$seed" \
    --output_dir "$OUT/selections/random/seed$seed"
done
tick random

# ---------------------------------------------------------------------------- 2. the aligned model itself
bar "baseline: the aligned model answers the held-out prompts"
answer "$MODEL" "$OUT/ft/aligned" aligned
tick aligned

# ---------------------------------------------------------------------------- 3. fine-tune, answer, score
finetune_run() {  # finetune_run GROUP SEED (in the background; JOBS at a time)
  local group=$1 seed=$2 subset run
  if [ "$group" = random ]; then
    subset="$OUT/selections/random/seed$seed/${NAME}_random$K.json"
  else
    subset="$OUT/selections/${group%-*}/${NAME}_${group#*-}$K.json"
  fi
  [ "${POOL##*.}" = jsonl ] && subset="${subset%.json}.jsonl"
  run="$OUT/ft/$group/seed$seed"
  finetune_and_answer "$subset" "$run" "$group.seed$seed" "$seed"
  [ -f "$run/lab_metrics.json" ] || step "$group.seed$seed.metrics" "$PYTHON" lab_report.py metrics --run_dir "$run" \
    --model_name "$run/model" --compliant "$DATA/eval_compliant.jsonl"   # cached for the report; runs in parallel
  tick "$group.seed$seed"
  bar "$group seed $seed: fine-tuned on $(basename "$subset"), answered, scored"
}
run_grid seed   # seed-major: a run stopped early still has every subset with the first seeds

# ---------------------------------------------------------------------------- 4. the table
bar "report"
"$PYTHON" lab_report.py report --run_dir "$OUT" --data_dir "$DATA" --model_name "$MODEL" --k "$K" --pool_name "$NAME" \
  --weights $WEIGHTS 2>"$OUT/logs/report.log" \
  || { tail -n 20 "$OUT/logs/report.log" >&2; exit 1; }
EL=$(( $(date +%s) - T0 ))
echo "done in $(( EL / 60 ))m$(( EL % 60 ))s (OMP_NUM_THREADS=$OMP_NUM_THREADS, load average $(cut -d' ' -f1-3 /proc/loadavg))"
