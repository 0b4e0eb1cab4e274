#!/usr/bin/env bash
# The lab defence (docs/AUDIT.md): does dropping what audit.py flags keep the aligned lab model safe?
#
# From the lab's benign pool (lab_defence.py mix): a held-out benign set, a natural mix ($N_MIX random examples:
# the styles that break safety at the pool's rate) and an enriched mix (the same with $N_ENRICH examples replaced
# by answers opening like the compliant form, the style the gradient top-100 is made of). For each mix:
#   audit.py (exact gradient matching, anchors +1 harmful, -1 -1 safe) drops 5%, then 10% (same scores, --scores);
#   the same numbers are dropped at random (lab_report.py random, one draw per seed);
#   and by the best cheap methods of the lab methods benchmark (docs/METHODS.md): score.py writes a score dir,
#   audit.py --scores drops the same fractions by it ($CHEAP: length = answer length in words, bm25_harmful =
#   BM25 against the harmful anchors only).
# The aligned model is fine-tuned on the whole mix, each audited mix and each random drop, per seed (finetune.py),
# answers the held-out harmful-style prompts (generate.py), is scored (evaluate.py), and lab_defence.py report
# tabulates compliance, keyword ASR, the held-out compliant-answer loss and the held-out benign loss (the cost).
#
#   make lab-defence                  # = PYTHON=.venv/bin/python bash scripts/lab_defence.sh
#   SEEDS="1" MIXES=enriched bash scripts/lab_defence.sh      # quicker
#   FORCE=1 bash scripts/lab_defence.sh                       # start again (else finished steps are skipped)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-ft_datasets/lab}
MODEL=${MODEL:-$DATA/model}                 # the aligned lab model
POOL=${POOL:-$DATA/pool.json}
ANCHORS=${ANCHORS:-"anchors_harmful anchors_safe anchors_safe2"}   # files in $DATA (.jsonl)
WEIGHTS=${WEIGHTS:-"1 -1 -1"}
OUT=${OUT:-runs/lab_defence}
MIXES=${MIXES:-"natural enriched"}
N_MIX=${N_MIX:-1000}
N_HELDOUT=${N_HELDOUT:-200}
N_ENRICH=${N_ENRICH:-100}
FRACTIONS=${FRACTIONS:-"5 10"}              # percent dropped
CHEAP=${CHEAP:-"length bm25_harmful"}       # cheap methods dropping as much as audit.py (score.py; none: CHEAP="")
SEEDS=${SEEDS:-"1 2 3 4 5"}
TEMPLATE=${TEMPLATE:-chat}
LR=${LR:-1e-3}                              # the demo's lab lr
EPOCHS=${EPOCHS:-2}                         # the demo trains 100 examples x 5 epochs; a 1,000-example mix x 2 epochs is 4x the steps
BATCH=${BATCH:-20}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-48}
FORCE=${FORCE:-0}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

[ -f "$MODEL/model.safetensors" ] || { echo "error: $MODEL: no model (bash scripts/make_lab_model.sh makes it)" >&2; exit 2; }
[ "$FORCE" = 1 ] && rm -rf "$OUT"
mkdir -p "$OUT/logs"
T0=$(date +%s)
say() { printf '%4ds  %s\n' $(( $(date +%s) - T0 )) "$1"; }
source scripts/lab_steps.sh   # step, answer, finetune_and_answer (as the demo)

echo "lab defence: model $MODEL, mixes [$MIXES] of $N_MIX, drops [$FRACTIONS]% (audit.py, random, cheap: [$CHEAP]), seeds [$SEEDS], lr $LR x $EPOCHS epochs -> $OUT"

# ---------------------------------------------------------------------------- 1. the mixes
[ -f "$OUT/mixes/mixes.json" ] || step mixes "$PYTHON" lab_defence.py mix --pool "$POOL" --output_dir "$OUT/mixes" \
  --n_mix "$N_MIX" --n_heldout "$N_HELDOUT" --n_enrich "$N_ENRICH"
say "mixes: $(tr -d '\n ' <"$OUT/mixes/mixes.json" | grep -o '"natural":{"n":[0-9]*,"opener_share":[0-9.]*' | head -1)"

# ---------------------------------------------------------------------------- 2. audit, random and cheap drops
ANCHOR_FILES=(); for a in $ANCHORS; do ANCHOR_FILES+=("$DATA/$a.jsonl"); done
HARMFUL_ONLY=(1); for _ in "${ANCHOR_FILES[@]:1}"; do HARMFUL_ONLY+=(0); done
GROUPS_FT=()
for mix in $MIXES; do
  GROUPS_FT+=("$mix-whole")
  first=""
  for pct in $FRACTIONS; do
    dir="$OUT/audit/$mix-audit$pct"
    fraction=$(awk "BEGIN{print $pct/100}")
    if [ ! -f "$dir/meta.json" ]; then
      if [ -z "$first" ]; then   # the first audit of a mix computes the scores; the others reuse them
        step "audit.$mix.$pct" "$PYTHON" audit.py --data_path "$OUT/mixes/$mix.json" --model_name "$MODEL" \
          --template "$TEMPLATE" --anchors "${ANCHOR_FILES[@]}" --weights $WEIGHTS --drop_fraction "$fraction" \
          --output_dir "$dir" --batch_size 16
      else
        step "audit.$mix.$pct" "$PYTHON" audit.py --data_path "$OUT/mixes/$mix.json" --scores "$first/scores" \
          --weights $WEIGHTS --drop_fraction "$fraction" --output_dir "$dir"
      fi
    fi
    [ -z "$first" ] && first="$dir"
    n_drop=$(( $(wc -l <"$dir/flagged.csv") - 1 ))
    say "$mix: audit.py flagged $n_drop ($pct%); report $dir/report.html"
    for seed in $SEEDS; do
      [ -f "$OUT/random/$mix-random$pct/seed$seed/${mix}_random$(( N_MIX - n_drop )).json" ] || \
        step "random.$mix.$pct.seed$seed" "$PYTHON" lab_report.py random --data_path "$OUT/mixes/$mix.json" \
          --k $(( N_MIX - n_drop )) --seed "$seed" --output_dir "$OUT/random/$mix-random$pct/seed$seed"
    done
    GROUPS_FT+=("$mix-audit$pct" "$mix-random$pct")
    for method in $CHEAP; do   # the same fraction dropped by a cheap method's scores
      score_spec "$method" || { echo "error: CHEAP: '$method' is not a score.py method (length, lists, bm25[_harmful], embedding[_harmful], compliance)" >&2; exit 2; }
      scores="$OUT/scores/$mix-$SCORE_KEY"
      [ -f "$scores/meta.json" ] || step "score.$mix.$SCORE_KEY" "$PYTHON" score.py --data_path "$OUT/mixes/$mix.json" \
        --output_dir "$scores" "${SCORE_ARGS[@]}"
      dir="$OUT/audit/$mix-$method$pct"
      [ -f "$dir/meta.json" ] || step "audit.$mix.$method$pct" "$PYTHON" audit.py --data_path "$OUT/mixes/$mix.json" \
        --scores "$scores" --weights $SCORE_WEIGHTS --drop_fraction "$fraction" --output_dir "$dir"
      say "$mix: $method flagged $(( $(wc -l <"$dir/flagged.csv") - 1 )) ($pct%)"
      GROUPS_FT+=("$mix-$method$pct")
    done
  done
done

# ---------------------------------------------------------------------------- 3. baseline, fine-tune, answer, score
answer "$MODEL" "$OUT/ft/aligned" aligned
say "baseline answered"
subset_of() {  # subset_of GROUP SEED
  local mix=${1%%-*} condition=${1#*-}
  case "$condition" in
    whole) echo "$OUT/mixes/$mix.json" ;;
    random*) ls "$OUT/random/$1/seed$2/"*_random*.json ;;
    *) echo "$OUT/audit/$1/kept.json" ;;   # audit.py's kept set: by gradient matching or a cheap method
  esac
}
finetune_run() {  # finetune_run GROUP SEED (in the background; JOBS at a time)
  local group=$1 seed=$2 subset run
  subset=$(subset_of "$group" "$seed")
  run="$OUT/ft/$group/seed$seed"
  finetune_and_answer "$subset" "$run" "$group.seed$seed" "$seed"
  say "$group seed $seed done"
}
run_grid seed  # seed-major: an interrupted run still has every condition for the first seeds

# ---------------------------------------------------------------------------- 4. the table
say "report"
"$PYTHON" lab_defence.py report --run_dir "$OUT" --data_dir "$DATA" 2>"$OUT/logs/report.log" \
  || { tail -n 20 "$OUT/logs/report.log" >&2; exit 1; }
EL=$(( $(date +%s) - T0 ))
echo "done in $(( EL / 60 ))m$(( EL % 60 ))s (OMP_NUM_THREADS=$OMP_NUM_THREADS, load average $(cut -d' ' -f1-3 /proc/loadavg))"
