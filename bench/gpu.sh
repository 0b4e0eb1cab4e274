#!/usr/bin/env bash
# The gradient and representation benchmarks on one GPU (an H200) with the Llama-2-7B configuration
# (random weights, bf16), then the real-model study at reduced size (bench/gpu_lab_real.sh) in the time left,
# within 10 minutes in all. Writes JSON and logs into $OUT (default bench/results/gpu).
#
#   OUT=/some/dir bash bench/gpu.sh            (PYTHON=... to choose the interpreter; default: python3,
#                                               or .venv/bin/python where that one has CUDA)
#
# Data: the real Alpaca file and the paper's anchors are read from ../shared/data (the Alpaca file from
# $SAFEDATA_ALPACA if set: see bench/README.md). A device machine lacking them falls back to the project's lab
# pool and anchors (benign stand-ins; shorter records): the script says so, and the rates are then not Alpaca's.
# A benchmark step that fails or runs out of time is reported (FAILED.txt) and the next step still runs;
# the script then exits non-zero.
# Targets: gradient scores >= 45 examples/s (52k Alpaca in under 20 min) at <= 1.2x a training step.
#
#   bash bench/gpu.sh --dry_run   the whole script on the CPU at tiny size (no GPU checks, a 64-wide 2-layer
#                                 model, 8 records, fp32): every step, the summary and the JSON.
#
# Time budget on the H200 (each step has its own limit; the sum stays under 10 minutes):
#   nvidia-smi 30 s + environment 60 s + gradients 300 s + representations 120 s (+10 s kill grace each) +
#   summary: at most 8 min 50 s; the real-model study gets what is left of 575 s (+10 s grace), or is skipped.
#   Carry SmolLM2's small files for it (bench/README.md); without them that step fails and the others stand.
set -Eeuo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/gpu_args.sh" "$@"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step=""
trap 'rc=$?; echo "FAILED (exit $rc) during: ${step:-setup}" | tee -a "$OUT/FAILED.txt" >&2; exit $rc' ERR

failed=()
run_step() {   # run_step NAME SECONDS COMMAND...: a time limit per step, output kept in $OUT/NAME.log
    step="$1"; local limit="$2"; shift 2
    echo "=== $step (limit ${limit}s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$step.log" || rc=$?
    if (( rc != 0 )); then
        local why=""
        if (( rc == 124 || rc == 137 )); then why=" (time limit)"; fi
        echo "=== FAILED: $step exited $rc after $((SECONDS - start))s$why" | tee -a "$OUT/FAILED.txt" >&2
        failed+=("$step")
    else
        echo "=== $step done in $((SECONDS - start))s"
    fi
}

# What differs in a dry run: the device, the model and the sizes; every step and check below still runs.
if (( DRY )); then
    DEVICE=(--device cpu --dtype fp32) MODEL=(--config small --hidden 64 --layers 2)
    # in one process, as on CUDA (on CPU the benchmark otherwise starts a process per method)
    GRAD_SIZE=(--n 8 --batch_size 4 --repeats 1 --paper_n 1 --exactness_n 1 --inprocess)
    REP_SIZE=(--n 8 --batch_size 4 --repeats 1) LAB_REAL_ARGS=(--dry_run)
else
    DEVICE=(--device cuda --dtype bf16) MODEL=(--config llama2-7b)
    GRAD_SIZE=(--n 512 --batch_size 16 --repeats 2 --paper_n 8) REP_SIZE=(--n 256 --batch_size 16 --repeats 2)
    LAB_REAL_ARGS=()
fi

step="nvidia-smi"
if (( DRY )); then
    echo "dry run: no GPU checks" | tee "$OUT/nvidia-smi.txt"
else
    command -v nvidia-smi >/dev/null || { echo "FAILED: nvidia-smi not found (no NVIDIA GPU here?)" >&2; exit 1; }
    timeout 30 nvidia-smi | tee "$OUT/nvidia-smi.txt"
fi

step="python"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if [[ -x .venv/bin/python ]] && { (( DRY )) || .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }; then
        PYTHON=.venv/bin/python
    fi
fi
timeout 60 "$PYTHON" - "$DRY" <<'EOF' | tee "$OUT/environment.txt"
import sys
import torch, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)
if sys.argv[1] == "1":
    print("dry run: CPU, tiny model")
elif not torch.cuda.is_available():
    sys.exit("FAILED: torch sees no CUDA device")
else:
    props = torch.cuda.get_device_properties(0)
    print("gpu", props.name, f"{props.total_memory / 2**30:.0f} GiB")
    if props.total_memory < 70 * 2**30:
        sys.exit("FAILED: the 7B benchmarks need an 80 GB class GPU (the paper baseline holds 3 dense 7B targets)")
sys.path.insert(0, "bench")
import common
for name in ("ALPACA", "ANCHORS"):
    path = getattr(common, name)
    print(name, path, "found" if path.exists() else "MISSING: falling back to the lab stand-ins (rates not Alpaca's)")
EOF

# 1) gradient scores on the first 512 Alpaca records (bf16 weights, fp32 products), all methods in one process
#    (the model is built once), the important ones first; the paper's algorithm (3 dense 7B targets, 40 GB)
#    last and on its first 8 records. Each finished method is also in gradients.partial.json at once.
run_step gradients 300 "$PYTHON" bench/bench_gradients.py "${MODEL[@]}" "${DEVICE[@]}" "${GRAD_SIZE[@]}" \
    --output "$OUT/gradients.json" --methods ours train floor engine ours64 paper512 paper_dynamic

# 2) representations: the paper's way (bs1, pad 512, all hidden states and logits) vs ours vs the bare decoder.
run_step representations 120 "$PYTHON" bench/bench_representations.py "${MODEL[@]}" "${DEVICE[@]}" "${REP_SIZE[@]}" \
    --output "$OUT/representations.json"

# 3) the real-model study at reduced size with the device flags (bench/gpu_lab_real.sh: a stand-in of SmolLM2's
#    shape where its weights are absent), last and in what is left of the 10 minutes a device allows one command:
#    each step above is already in $OUT if this one is cut short. Skipped with less than a minute left.
if (( DRY )); then LAB_REAL_LEFT=1800; else LAB_REAL_LEFT=$(( 575 - SECONDS )); fi
if (( LAB_REAL_LEFT >= 60 )); then
    run_step lab_real "$LAB_REAL_LEFT" env OUT="$OUT" PYTHON="$PYTHON" bash bench/gpu_lab_real.sh "${LAB_REAL_ARGS[@]}"
else
    echo "=== lab_real skipped: ${LAB_REAL_LEFT}s left of the command's 10 minutes (run bench/gpu_lab_real.sh alone)" \
        | tee "$OUT/lab_real.log"
fi

step="summary"
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
if not (out / "gradients.json").exists():
    sys.exit(0)
g = json.loads((out / "gradients.json").read_text())
for c in g.get("checks", []):
    verdict = {True: "met", False: "MISSED", None: "information"}[c["met"]]
    print(f"{c['model']}: {c['check']} = {c['value']:.4g} (target {c['target']}): {verdict}")
EOF
if (( ${#failed[@]} )); then
    echo "FAILED steps: ${failed[*]} (see $OUT/FAILED.txt and the logs); other results in $OUT" >&2
    exit 1
fi
echo "all steps done; results in $OUT"
