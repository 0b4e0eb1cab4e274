#!/usr/bin/env bash
# Can a cheap signal find what a 7B model's gradients find? (docs/METHODS.md, "Real data")
#
# Scores the paper's Alpaca pool without safety data (50,098 records; prepare.py --paper_split) and GSM8K train
# (7,473) with every method that needs no LLM: random, BM25 and MiniLM embedding similarity (harmful-only and
# bi-directional: the paper's illegal-activities anchors, +1 harmful, -1 each safe set), and the format
# heuristics (list share, answer length). Then compares each ranking with the paper's released gradient and
# representation top/bottom-100 (compare_rankings.py). The anchors and released sets are read from $SHARED at
# run time; nothing of their text is written under docs/ (numbers and ids only).
#
# The embedding pass is the slow part (about 10 min for the 50,098 Alpaca records on 2 free cores at 128 tokens).
# Every method also runs on a sample pool (the 400 released Alpaca records + SAMPLE random others), where AUC
# is exact and the rest is relative to the sample; EMBED_FULL=0 skips the full-pool Alpaca embedding pass.
#
#   bash scripts/real_data_study.sh           # prepares ft_datasets/data if needed; finished score dirs are reused
#   FORCE=1 bash scripts/real_data_study.sh   # start again
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=${SHARED:-../shared/data}
DATA=${DATA:-ft_datasets/data}
OUT=${OUT:-runs/methods_study}
DOCS=${DOCS:-docs/methods_study}
SEED=${SEED:-0}
SAMPLE=${SAMPLE:-5000}
EMBED_FULL=${EMBED_FULL:-1}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-128}   # all-MiniLM-L6-v2 was trained on 128-token inputs; halves the pass
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PAPER=$SHARED/paper/ft_datasets
ANCHORS=("$DATA/pure-bad-illegal-activities-selected10.jsonl" "$DATA/pure-bad-illegal-acticities-selected-10-anchor1.jsonl"
         "$DATA/pure-bad-illegal-activities-selected-10-anchor2.jsonl")
[ "${FORCE:-0}" = 1 ] && rm -rf "$OUT"
mkdir -p "$OUT/logs"
if [ ! -f "$DATA/alpaca_data_no_safety.json" ] || [ ! -f "$DATA/gsm8k_train.jsonl" ] || [ ! -f "${ANCHORS[2]}" ]; then
  "$PYTHON" ft_datasets/prepare.py --paper_split --from "$SHARED" --output_dir "$DATA" --only alpaca_data gsm8k_train \
    pure-bad-illegal-activities-selected10 pure-bad-illegal-acticities-selected-10-anchor1 \
    pure-bad-illegal-activities-selected-10-anchor2 >"$OUT/logs/prepare.log"
fi
T0=$(date +%s)
score() {  # score POOL_NAME POOL METHOD_DIR score.py-args...
  local name=$1 pool=$2 dir="$OUT/$1/$3"; shift 3
  if [ ! -f "$dir/scores.csv" ]; then
    echo "$(date -u +%H:%M:%S) $name: $(basename "$dir")"
    "$PYTHON" score.py --data_path "$pool" --output_dir "$dir" --skip_bad "$@" >"$OUT/logs/$name.$(basename "$dir").log" 2>&1 \
      || { tail -n 5 "$OUT/logs/$name.$(basename "$dir").log" >&2; exit 1; }
  fi
}
ALPACA_REFS=(--reference "gradient=$PAPER/alpaca_dataset/gradient-illegal-activities-anchor/alpaca_top100.json,$PAPER/alpaca_dataset/gradient-illegal-activities-anchor/alpaca_bottom100.json"
             --reference "representation=$PAPER/alpaca_dataset/reps/alpaca_top100.json,$PAPER/alpaca_dataset/reps/alpaca_bottom100.json")
mkdir -p "$OUT/alpaca_sample"
[ -f "$OUT/alpaca_sample/pool.json" ] || "$PYTHON" compare_rankings.py --data_path "$DATA/alpaca_data_no_safety.json" \
  "${ALPACA_REFS[@]}" --write_sample "$OUT/alpaca_sample/pool.json" --sample_size "$SAMPLE" --seed "$SEED" >/dev/null
for spec in "gsm8k:$DATA/gsm8k_train.jsonl" "alpaca_sample:$OUT/alpaca_sample/pool.json" "alpaca:$DATA/alpaca_data_no_safety.json"; do
  name=${spec%%:*}; pool=${spec#*:}
  score "$name" "$pool" random --method random --seed "$SEED"
  score "$name" "$pool" lists --method format --feature list_share
  score "$name" "$pool" length --method format --feature answer_words
  score "$name" "$pool" bm25 --method bm25 --anchors "${ANCHORS[@]}"
  [ "$name" = alpaca ] && [ "$EMBED_FULL" != 1 ] && continue
  score "$name" "$pool" embedding --method embedding --anchors "${ANCHORS[@]}" --max_seq_length "$MAX_SEQ_LENGTH" \
    --batch_size 32 --chunk_size 1024
done
methods() {  # the compared rankings of one pool: harmful-only = weights 1 0 0, bi-directional = 1 -1 -1
  local d="$OUT/$1"
  echo --method "random=$d/random" --method "bm25_harmful=$d/bm25:1,0,0" --method "bm25=$d/bm25:1,-1,-1"
  [ -f "$d/embedding/scores.csv" ] && echo --method "embedding_harmful=$d/embedding:1,0,0" --method "embedding=$d/embedding:1,-1,-1"
  echo --method "lists=$d/lists" --method "length=$d/length"
}
"$PYTHON" compare_rankings.py --data_path "$DATA/alpaca_data_no_safety.json" $(methods alpaca) --title "Alpaca (50,098)" \
  "${ALPACA_REFS[@]}" --output_dir "$DOCS/alpaca"
"$PYTHON" compare_rankings.py --data_path "$OUT/alpaca_sample/pool.json" $(methods alpaca_sample) \
  --title "Alpaca sample (400 released + $SAMPLE random)" "${ALPACA_REFS[@]}" --output_dir "$DOCS/alpaca_sample"
"$PYTHON" compare_rankings.py --data_path "$DATA/gsm8k_train.jsonl" $(methods gsm8k) --title "GSM8K (7,473)" \
  --reference "gradient=$PAPER/gsm8k/gradient-illegal-activities-anchor/gsm8k_top100.json,$PAPER/gsm8k/gradient-illegal-activities-anchor/gsm8k_bottom100.json" \
  --output_dir "$DOCS/gsm8k"
EL=$(( $(date +%s) - T0 ))
echo "study done in $(( EL / 60 ))m$(( EL % 60 ))s (scoring steps skipped when their score dir existed); tables: $DOCS/*/agreement.md"
