# The paper recipes' shared variables (sourced by get_representation.sh, get_full_gradient.sh, rank.sh).
# Every variable can be set in the environment; output folders are keyed by model, pool and the
# settings that define the numbers, so switching POOL (or a length) never collides with an earlier run.

PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
MODEL=${MODEL:-meta-llama/Llama-2-7b-chat-hf}
TEMPLATE=${TEMPLATE:-paper}
DATA_DIR=${DATA_DIR:-ft_datasets/data}
POOL=${POOL:-$DATA_DIR/alpaca_data_no_safety.json}
HARMFUL=${HARMFUL:-$DATA_DIR/pure-bad-illegal-activities-selected10.jsonl}
SAFE1=${SAFE1:-$DATA_DIR/pure-bad-illegal-acticities-selected-10-anchor1.jsonl}   # (sic) the paper's file name
SAFE2=${SAFE2:-$DATA_DIR/pure-bad-illegal-activities-selected-10-anchor2.jsonl}
RUNS=${RUNS:-runs}                         # root of every output folder below

# The original cut every example at a per-dataset length; a representation is read at the last kept
# token. Set a variable to empty (e.g. POOL_MAX_LENGTH=) for no cut.
ALPACA_MAX_LENGTH=${ALPACA_MAX_LENGTH-512}
DOLLY_MAX_LENGTH=${DOLLY_MAX_LENGTH-2048}
GSM8K_MAX_LENGTH=${GSM8K_MAX_LENGTH-2048}
ANCHOR_MAX_LENGTH=${ANCHOR_MAX_LENGTH-480}
case "$(basename "$POOL" | tr '[:upper:]' '[:lower:]')" in
  *dolly*) _pool_default=$DOLLY_MAX_LENGTH ;;
  *gsm8k*) _pool_default=$GSM8K_MAX_LENGTH ;;
  *) _pool_default=$ALPACA_MAX_LENGTH ;;    # Alpaca, and any other pool
esac
POOL_MAX_LENGTH=${POOL_MAX_LENGTH-$_pool_default}
ORIGINAL_QUIRKS=${ORIGINAL_QUIRKS:-0}      # 1: what the original computed (--original_quirks: a supervised trailing
                                           # space; for gradient targets also its never-zeroed anchor gradients)
EXTRA=${EXTRA:-}                           # more flags for every python call, e.g. "--dtype fp32 --skip_bad"

# Output folders are keyed by MODEL_NAME: a Hub id with '/' as '--' (meta-llama--Llama-2-7b-chat-hf); a local
# directory by its name and the first 8 hex digits of its absolute path's sha256, so two checkpoints in folders
# both named hf/ never share outputs. Set MODEL_NAME to name them yourself.
if [[ -z "${MODEL_NAME:-}" ]]; then
  if [[ -d "$MODEL" ]]; then
    _model_abs=$(cd "$MODEL" && pwd -P)
    MODEL_NAME="$(basename "$_model_abs")-$(printf '%s' "$_model_abs" | sha256sum | cut -c1-8)"
  else
    MODEL_NAME=${MODEL//\//--}
  fi
fi
# What a refusal to reuse an output folder tells a recipe user to change (they pass no --output_dir).
export SAFEDATA_OUTPUT_HINT="set MODEL_NAME (now $MODEL_NAME), RUNS or OUT to write elsewhere"
POOL_NAME=$(basename "${POOL%.*}")
_quirks_tag=$([[ "$ORIGINAL_QUIRKS" == 1 ]] && echo "_original" || true)
SETTINGS_TAG="${TEMPLATE}_len${POOL_MAX_LENGTH:-all}-${ANCHOR_MAX_LENGTH:-all}${_quirks_tag}"

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

# next_hint SCRIPT VAR...: the command that continues this run, carrying the variables that locate its outputs.
next_hint() {
  local script=$1 var line="next:"
  shift
  for var in "$@" MODEL POOL TEMPLATE POOL_MAX_LENGTH ANCHOR_MAX_LENGTH ORIGINAL_QUIRKS RUNS; do
    line+=" $var=$(printf '%q' "${!var}")"
  done
  echo "$line bash scripts/$script"
}
