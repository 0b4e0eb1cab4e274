# The lab's pipeline steps, shared by scripts/demo.sh and scripts/lab_defence.sh (sourced, not run).
# They read the caller's variables: PYTHON, OUT, DATA, MODEL, TEMPLATE, MAX_NEW_TOKENS, LR, EPOCHS, BATCH
# (score_spec: ANCHOR_FILES, HARMFUL_ONLY, WEIGHTS).

declare -p TIMED >/dev/null 2>&1 || TIMED=()   # a command prefix for every step (e.g. /usr/bin/time ...), or none
step() {  # step LOG cmd...: run quietly into $OUT/logs/LOG.log; on failure show its tail and stop
  local log="$OUT/logs/$1.log"; shift
  local timed=("${TIMED[@]}")   # COST_DIR (scripts/lab_methods.sh): the step's wall seconds and peak memory there
  if [ -n "${COST_DIR:-}" ]; then mkdir -p "$COST_DIR"; timed=(/usr/bin/time -o "$COST_DIR/${log##*/}" -f "%e %M"); fi
  if ! "${timed[@]}" "$@" >"$log" 2>&1; then
    echo "FAILED: $* (log: $log)" >&2; tail -n 20 "$log" | tr '\r' '\n' | tail -n 20 >&2; exit 1
  fi
}
answer() {  # answer MODEL DIR LOG: generate on the held-out prompts and score (skipped when done)
  [ -f "$2/gen/responses.jsonl" ] || step "$3.generate" "$PYTHON" generate.py --model_name "$1" \
    --data_path "$DATA/eval_prompts.jsonl" --output_dir "$2/gen" --template "$TEMPLATE" \
    --max_new_tokens "$MAX_NEW_TOKENS" --batch_size 64 --overwrite
  [ -f "$2/eval/summary.json" ] || step "$3.evaluate" "$PYTHON" evaluate.py \
    --responses "$2/gen/responses.jsonl" --output_dir "$2/eval"
}
finetune_and_answer() {  # finetune_and_answer SUBSET RUN_DIR LOG SEED: fine-tune $MODEL on SUBSET, answer, score
  [ -f "$2/model/finetune_meta.json" ] || step "$3.finetune" "$PYTHON" finetune.py \
    --model_name "$MODEL" --data_path "$1" --output_dir "$2/model" --template "$TEMPLATE" \
    --lr "$LR" --epochs "$EPOCHS" --batch_size "$BATCH" --seed "$4" --overwrite
  answer "$2/model" "$2" "$3"
}
run_grid() {  # run_grid group|seed: the caller's `finetune_run GROUP SEED` for every group in GROUPS_FT and seed in
  # SEEDS, JOBS at a time in the background, group-major or seed-major; stops at the first failure, then checks
  local pairs=() group seed pair
  if [ "$1" = seed ]; then
    for seed in $SEEDS; do for group in "${GROUPS_FT[@]}"; do pairs+=("$group $seed"); done; done
  else
    for group in "${GROUPS_FT[@]}"; do for seed in $SEEDS; do pairs+=("$group $seed"); done; done
  fi
  for pair in "${pairs[@]}"; do
    finetune_run $pair &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do
      wait -n || { echo "a fine-tuning run failed; stopping" >&2; kill $(jobs -rp) 2>/dev/null || true; exit 1; }
    done
  done
  wait || true
  for pair in "${pairs[@]}"; do
    set -- $pair
    [ -f "$OUT/ft/$1/seed$2/eval/summary.json" ] || { echo "error: run $1 seed $2 did not finish (logs: $OUT/logs/$1.seed$2.*)" >&2; exit 1; }
  done
}
score_spec() {  # score_spec METHOD: a score.py method's arguments (SCORE_ARGS), the weights that rank its score
  # dir (SCORE_WEIGHTS) and the dir's name (SCORE_KEY: harmful-only methods share the bi-directional scores);
  # returns 1 for a method score.py does not make
  case "$1" in
    bm25|embedding) SCORE_KEY=$1 SCORE_WEIGHTS="$WEIGHTS" SCORE_ARGS=(--method "$1" --anchors "${ANCHOR_FILES[@]}");;
    bm25_harmful|embedding_harmful) SCORE_KEY=${1%_harmful} SCORE_WEIGHTS="${HARMFUL_ONLY[*]}"
      SCORE_ARGS=(--method "${1%_harmful}" --anchors "${ANCHOR_FILES[@]}");;
    lists) SCORE_KEY=lists SCORE_WEIGHTS=1 SCORE_ARGS=(--method format --feature list_share);;
    length) SCORE_KEY=length SCORE_WEIGHTS=1 SCORE_ARGS=(--method format --feature answer_words);;
    compliance) SCORE_KEY=compliance SCORE_WEIGHTS=1 SCORE_ARGS=(--method compliance --model_name "$MODEL"
      --template "$TEMPLATE" --anchors "${ANCHOR_FILES[@]}" --batch_size 32);;
    *) return 1;;
  esac
}
