#!/usr/bin/env bash
# Study 2 (docs/real_model/PREREG.md), run by lab/study2/run.py: data, draws, the aligned model's evaluation, Arm A,
# Arm B and the anchor diagnosis in PREREG's order. Every stage skips finished work (kept records in
# lab/study2/results, keyed by settings + subset sha256) and resumes stopped work (fine-tunes from their 10-minute
# checkpoints, generation from its last batch), so after a kill the same command goes on where it stopped. Runs in
# the background at nice 19:
#
#   bash scripts/study2.sh                 # the whole study (Arm A seeds 1 2 3); log: runs/study2/log.txt
#   SEEDS=1 bash scripts/study2.sh         # Arm A seed 1's six runs only (Arm B waits for all of Arm A)
#   COMMAND=report bash scripts/study2.sh  # (foreground) the report recounted from the kept flags: docs/real_model/study2
#   FOREGROUND=1 bash scripts/study2.sh    # in this shell
#
# Commit lab/study2/results and lab/study2/selections as runs finish (no text is in them), with the report they give.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-"1 2 3"}
COMMAND=${COMMAND:-all}
LOG=${LOG:-runs/study2/log.txt}
mkdir -p runs/study2
[ -f models/smollm2-135m-aligned/finetune_meta.json ] || "$PYTHON" lab_real.py build
if [ "$COMMAND" = report ] || [ "$COMMAND" = budget ]; then
  exec "$PYTHON" -m lab.study2.run "$COMMAND"
fi
if [ -n "${FOREGROUND:-}" ]; then
  exec nice -n 19 "$PYTHON" -m lab.study2.run "$COMMAND" --seeds $SEEDS
fi
nohup setsid nice -n 19 "$PYTHON" -m lab.study2.run "$COMMAND" --seeds $SEEDS >> "$LOG" 2>&1 < /dev/null &
echo "started: pid $! (log $LOG); stop: kill -- -$!; resume: rerun this command"
echo $! > runs/study2/pid
