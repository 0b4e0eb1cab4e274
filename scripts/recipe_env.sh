# The paper recipes' shared variables (sourced by get_representation.sh, get_full_gradient.sh, rank.sh from the
# project root: each recipe finds it first, from PROJECT_DIR, its own folder or SLURM_SUBMIT_DIR). Every variable
# can be set in the environment; output folders are keyed by model, pool and the settings that define the numbers (template, lengths), so
# switching POOL, TEMPLATE or a length never collides with an earlier run.

PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
MODEL=${MODEL:-meta-llama/Llama-2-7b-chat-hf}
TEMPLATE=${TEMPLATE:-}                      # empty: the model's own, chosen as every CLI chooses it when --template is
                                           # not given (safedata/templates.py); paper = Llama-2's [INST] (the paper's)
DATA_DIR=${DATA_DIR:-ft_datasets/data}
POOL=${POOL:-$DATA_DIR/alpaca_data_no_safety.json}
HARMFUL=${HARMFUL:-$DATA_DIR/pure-bad-illegal-activities-selected10.jsonl}
SAFE1=${SAFE1:-$DATA_DIR/pure-bad-illegal-acticities-selected-10-anchor1.jsonl}   # (sic) the paper's file name
SAFE2=${SAFE2:-$DATA_DIR/pure-bad-illegal-activities-selected-10-anchor2.jsonl}
RUNS=${RUNS:-runs}                         # root of every output folder below

# The original cut every example at a per-dataset length; a representation is read at the last kept
# token. The cut applies to the paper's own pools only (the names ft_datasets/prepare.py writes: alpaca_data*,
# databricks-dolly-15k* / dolly*, gsm8k*); any other pool is not cut unless POOL_MAX_LENGTH is set. Set a
# variable to empty (e.g. POOL_MAX_LENGTH=) for no cut.
ALPACA_MAX_LENGTH=${ALPACA_MAX_LENGTH-512}
DOLLY_MAX_LENGTH=${DOLLY_MAX_LENGTH-2048}
GSM8K_MAX_LENGTH=${GSM8K_MAX_LENGTH-2048}
ANCHOR_MAX_LENGTH=${ANCHOR_MAX_LENGTH-480}
case "$(basename "$POOL" | tr '[:upper:]' '[:lower:]')" in
  alpaca_data*) _pool_default=$ALPACA_MAX_LENGTH ;;
  databricks-dolly-15k*|dolly*) _pool_default=$DOLLY_MAX_LENGTH ;;
  gsm8k*) _pool_default=$GSM8K_MAX_LENGTH ;;
  *) _pool_default= ;;                      # any other pool: whole examples
esac
POOL_MAX_LENGTH=${POOL_MAX_LENGTH-$_pool_default}
ORIGINAL_QUIRKS=${ORIGINAL_QUIRKS:-0}      # 1: what the original computed (--original_quirks: a supervised trailing
                                           # space; for gradient targets also its never-zeroed anchor gradients)
EXTRA=${EXTRA:-}                           # more flags for every python call, e.g. "--dtype fp32 --skip_bad"

# Output folders are keyed by MODEL_NAME: a Hub id with '/' as '--' (meta-llama--Llama-2-7b-chat-hf); a local
# directory by its name and the first 8 hex digits of its content hash (config, weights, tokenizer), so two
# checkpoints in folders both named hf/ never share outputs and a moved model keeps its finished work. Set
# MODEL_NAME to name them yourself. The template the runs use: TEMPLATE when set (passed as --template), else the
# model's own, which the CLIs choose themselves (no --template; they record it in meta.json). Both key the output
# folders and are carried to the next step, so they come from the package's own rules, read once here
# (safedata/recipe_env.py); with MODEL_NAME and TEMPLATE both set the model is not read.
if [[ -n "${MODEL_NAME:-}" && -n "$TEMPLATE" ]]; then
  TEMPLATE_USED=$TEMPLATE
else
  _values=$("$PYTHON" -m safedata.recipe_env "$MODEL" "$TEMPLATE") || exit 2
  MODEL_NAME=${MODEL_NAME:-${_values%%$'\n'*}}
  TEMPLATE_USED=${_values#*$'\n'}
fi
# What a refusal to reuse an output folder tells a recipe user to change (they pass no --output_dir).
export SAFEDATA_OUTPUT_HINT="set MODEL_NAME (now $MODEL_NAME), RUNS or OUT to write elsewhere"
POOL_NAME=$(basename "${POOL%.*}")
template_flag=()
if [[ -n "$TEMPLATE" ]]; then template_flag=(--template "$TEMPLATE"); fi
_quirks_tag=$([[ "$ORIGINAL_QUIRKS" == 1 ]] && echo "_original" || true)
SETTINGS_TAG="${TEMPLATE_USED}_len${POOL_MAX_LENGTH:-all}-${ANCHOR_MAX_LENGTH:-all}${_quirks_tag}"

# Flags of every feature/score run, and the per-file cut.
quirks_flag=()
if [[ "$ORIGINAL_QUIRKS" == 1 ]]; then quirks_flag=(--original_quirks); fi
pool_cut=()
if [[ -n "$POOL_MAX_LENGTH" ]]; then pool_cut=(--max_length "$POOL_MAX_LENGTH"); fi
anchor_cut=()
if [[ -n "$ANCHOR_MAX_LENGTH" ]]; then anchor_cut=(--max_length "$ANCHOR_MAX_LENGTH"); fi

# require_files VAR...: each variable's file exists, else one error line naming the variable and how to get it.
require_files() {
  local var
  for var in "$@"; do
    if [[ ! -f "${!var}" ]]; then
      echo "error: $var=${!var}: no such file; the recipes read the paper's files from DATA_DIR=$DATA_DIR: write them with python ft_datasets/prepare.py (offline: --from DIR), or set DATA_DIR or $var" >&2
      exit 2
    fi
  done
}

# describe_settings: one stderr line with what the run uses (template, cuts), so that no cut is silent.
describe_settings() {
  local why="TEMPLATE" pool="not cut" anchors="not cut"
  if [[ -z "$TEMPLATE" ]]; then why="the model's own"; fi
  if [[ -n "$POOL_MAX_LENGTH" ]]; then pool="cut at $POOL_MAX_LENGTH tokens"; fi
  if [[ -n "$ANCHOR_MAX_LENGTH" ]]; then anchors="cut at $ANCHOR_MAX_LENGTH tokens"; fi
  echo "recipe: model $MODEL, template $TEMPLATE_USED ($why); pool $POOL $pool (POOL_MAX_LENGTH), anchors" \
       "$anchors (ANCHOR_MAX_LENGTH)" >&2
}

# next_hint SCRIPT VAR...: the command that continues this run, carrying the variables that locate its outputs
# (TEMPLATE as resolved), as its last line: run it as printed from the project root.
next_hint() {
  local script=$1 var value line=""
  shift
  for var in "$@" MODEL MODEL_NAME TEMPLATE POOL POOL_MAX_LENGTH ANCHOR_MAX_LENGTH ORIGINAL_QUIRKS RUNS; do
    value=${!var}
    if [[ "$var" == TEMPLATE ]]; then value=$TEMPLATE_USED; fi
    line+="$var=$(printf '%q' "$value") "
  done
  echo "next, from the project root:"
  echo "${line}bash scripts/$script"
}
