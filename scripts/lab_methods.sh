#!/usr/bin/env bash
# make lab-methods: every selection method side by side in the mini safety lab (docs/METHODS.md).
#
# The same pipeline as make demo (scripts/demo.sh: rank, fine-tune the aligned lab model on each top-100, answer
# the held-out prompts, score), with every method and 5 seeds (the paper's count), the selection steps timed
# (COSTS=1: wall seconds and peak memory of each step, /usr/bin/time), then lab_report.py methods: one table
# (mean, sd, 95% interval, per-seed values, composition, selection cost) and one plot in $OUT/report/.
#
#   make lab-methods                            # = PYTHON=.venv/bin/python bash scripts/lab_methods.sh
#   EPOCHS=3 bash scripts/lab_methods.sh        # any demo.sh variable can be overridden
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export PYTHON
export OUT=${OUT:-runs/lab_methods}
export SEEDS=${SEEDS:-"1 2 3 4 5"}
# Self-influence (selfinf, selfinfn) joins when get_gradients.py has --self_influence.
DEFAULT_METHODS="grad reps bm25 bm25_harmful embedding embedding_harmful lists length compliance"
grep -q -- "--self_influence" get_gradients.py && DEFAULT_METHODS="$DEFAULT_METHODS selfinf selfinfn"
export METHODS=${METHODS:-$DEFAULT_METHODS}
export COSTS=1
[ "${FORCE:-0}" = 1 ] && rm -rf "$OUT"
T0=$(date +%s)
bash scripts/demo.sh
"$PYTHON" lab_report.py methods --run_dir "$OUT" 2>"$OUT/logs/methods_report.log" \
  || { tail -n 20 "$OUT/logs/methods_report.log" >&2; exit 1; }
EL=$(( $(date +%s) - T0 ))
echo "lab-methods done in $(( EL / 60 ))m$(( EL % 60 ))s"
