#!/usr/bin/env bash
# The mini safety lab's aligned model (docs/LAB.md): a ~1.6M-parameter Llama with the project's own BPE
# tokenizer, "pretrained" and then "aligned" with finetune.py on the lab data, on 2 CPU cores.
#
#   stage 0  scripts/make_tiny_model.py: random Llama (hidden 128, 4 layers, 4 heads) + a 2048-token BPE trained
#            on the lab texts (Llama-2-style chat template)
#   stage 1  pretraining: finetune.py on pretrain.jsonl (benign instructions AND placeholder compliant answers
#            for every harmful-style task: the base model knows how to comply)
#   stage 2  alignment: finetune.py on align.jsonl (refusals for the alignment tasks + benign replay)
#   check    generate.py + evaluate.py + lab_report.py metrics on the HELD-OUT tasks (eval_prompts.jsonl),
#            after stage 1 (should comply) and after stage 2 (should refuse)
#   commit   the aligned checkpoint -> $OUT (weights, config, tokenizer, finetune_meta.json) + lab_model.json
#            (this recipe's settings, timings and the measured metrics)
#
# Template: chat (the tiny tokenizer's Llama-2-style template "[INST] {request} [/INST] {answer} </s>": short
# prompts, so training is fast; the demo, generation and features all use it too).
# Learning rates: 3e-3 / 1e-3 (a 1.6M model; the paper's 5e-5 is for 7B), the paper's per-epoch decay 0.85.
# Stages whose output is complete are skipped, so a killed run continues; FORCE=1 starts again.
#
#   bash scripts/make_lab_model.sh                 # ~7 min on one shared core (docs/LAB.md has measured times)
#   PRETRAIN_EPOCHS=4 OUT=/tmp/m WORK=/tmp/w bash scripts/make_lab_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-ft_datasets/lab}
OUT=${OUT:-$DATA/model}
WORK=${WORK:-runs/lab_model}
TEMPLATE=${TEMPLATE:-chat}
VOCAB=${VOCAB:-2048}
HIDDEN=${HIDDEN:-128}
LAYERS=${LAYERS:-4}
HEADS=${HEADS:-4}
MODEL_SEED=${MODEL_SEED:-0}
PRETRAIN_LR=${PRETRAIN_LR:-3e-3}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-6}
ALIGN_LR=${ALIGN_LR:-1e-3}
ALIGN_EPOCHS=${ALIGN_EPOCHS:-3}
BATCH=${BATCH:-16}
SEED=${SEED:-0}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-48}
FORCE=${FORCE:-0}
# One thread: on 2 shared cores a 1.6M model trains 2.5-3.5x faster on 1 thread than on 2 (docs/LAB.md).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CORPUS=${CORPUS:-"$DATA/pretrain.jsonl $DATA/align.jsonl $DATA/pool.json $DATA/harmful_compliant.jsonl $DATA/harmful_refusal.jsonl $DATA/eval_compliant.jsonl"}

for f in $CORPUS "$DATA/eval_prompts.jsonl"; do
  [ -f "$f" ] || { echo "error: $f missing (python ft_datasets/lab/make_lab_data.py writes the lab data)" >&2; exit 2; }
done
[ "$FORCE" = 1 ] && rm -rf "$WORK"
mkdir -p "$WORK"
T0=$(date +%s)
stamp() { echo "$(( $(date +%s) - T0 ))"; }

echo "== stage 0: tiny model (vocab $VOCAB, hidden $HIDDEN, $LAYERS layers) -> $WORK/base"
if [ ! -f "$WORK/base/model.safetensors" ]; then
  # = scripts/make_tiny_model.py --output_dir $WORK/base --vocab_size $VOCAB --hidden_size $HIDDEN --num_layers $LAYERS
  #   --num_heads $HEADS --seed $MODEL_SEED --corpus $CORPUS; called directly (the same function) because that CLI
  #   hands --corpus over as strings, which safedata.models._corpus_lines does not take yet (it reads path.suffix).
  # shellcheck disable=SC2086
  "$PYTHON" -c 'import sys; from pathlib import Path; from safedata.models import make_tiny_model
out, hidden, layers, heads, vocab, seed, *corpus = sys.argv[1:]
print("wrote", make_tiny_model(out, int(hidden), int(layers), int(heads), int(vocab), int(seed), [Path(c) for c in corpus]))' \
    "$WORK/base" "$HIDDEN" "$LAYERS" "$HEADS" "$VOCAB" "$MODEL_SEED" $CORPUS
fi
T_BASE=$(stamp)

echo "== stage 1: pretraining on $DATA/pretrain.jsonl (lr $PRETRAIN_LR, $PRETRAIN_EPOCHS epochs) -> $WORK/pretrained"
[ -f "$WORK/pretrained/finetune_meta.json" ] || \
  "$PYTHON" finetune.py --model_name "$WORK/base" --data_path "$DATA/pretrain.jsonl" --output_dir "$WORK/pretrained" \
    --template "$TEMPLATE" --lr "$PRETRAIN_LR" --epochs "$PRETRAIN_EPOCHS" --batch_size "$BATCH" --seed "$SEED" --overwrite
T_PRETRAIN=$(stamp)

echo "== stage 2: alignment on $DATA/align.jsonl (lr $ALIGN_LR, $ALIGN_EPOCHS epochs) -> $WORK/aligned"
[ -f "$WORK/aligned/finetune_meta.json" ] || \
  "$PYTHON" finetune.py --model_name "$WORK/pretrained" --data_path "$DATA/align.jsonl" --output_dir "$WORK/aligned" \
    --template "$TEMPLATE" --lr "$ALIGN_LR" --epochs "$ALIGN_EPOCHS" --batch_size "$BATCH" --seed "$SEED" --overwrite
T_ALIGN=$(stamp)

echo "== check: held-out harmful-style prompts ($DATA/eval_prompts.jsonl), greedy, $MAX_NEW_TOKENS new tokens"
for stage in pretrained aligned; do
  "$PYTHON" generate.py --model_name "$WORK/$stage" --data_path "$DATA/eval_prompts.jsonl" \
    --output_dir "$WORK/check/$stage/gen" --max_new_tokens "$MAX_NEW_TOKENS" --batch_size 64 --overwrite
  "$PYTHON" evaluate.py --responses "$WORK/check/$stage/gen/responses.jsonl" --output_dir "$WORK/check/$stage/eval" >/dev/null
  "$PYTHON" lab_report.py metrics --model_name "$WORK/$stage" --responses "$WORK/check/$stage/gen/responses.jsonl" \
    --compliant "$DATA/eval_compliant.jsonl" --output "$WORK/check/$stage/metrics.json" >/dev/null
done
T_CHECK=$(stamp)

echo "== commit: $WORK/aligned -> $OUT"
mkdir -p "$OUT"
rm -f "$OUT"/*.safetensors
cp "$WORK/aligned"/{model.safetensors,config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,finetune_meta.json} "$OUT"/
export TEMPLATE VOCAB HIDDEN LAYERS HEADS MODEL_SEED PRETRAIN_LR PRETRAIN_EPOCHS ALIGN_LR ALIGN_EPOCHS BATCH SEED MAX_NEW_TOKENS
"$PYTHON" - "$WORK" "$OUT" "$T_BASE" "$T_PRETRAIN" "$T_ALIGN" "$T_CHECK" <<'EOF'
import json, os, sys
from safetensors.torch import load_file
from safedata.store import write_json
work, out, t_base, t_pre, t_align, t_check = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
metrics = {s: json.load(open(f"{work}/check/{s}/metrics.json")) for s in ("pretrained", "aligned")}
for m in metrics.values():
    m.pop("model", None); m.pop("responses", None)
meta = {s: json.load(open(f"{work}/{s}/finetune_meta.json")) for s in ("pretrained", "aligned")}
card = {
    "recipe": "scripts/make_lab_model.sh",
    "settings": {k: os.environ.get(k) for k in ("TEMPLATE", "VOCAB", "HIDDEN", "LAYERS", "HEADS", "MODEL_SEED",
                                                "PRETRAIN_LR", "PRETRAIN_EPOCHS", "ALIGN_LR", "ALIGN_EPOCHS",
                                                "BATCH", "SEED", "MAX_NEW_TOKENS")},
    "parameters": sum(t.numel() for t in load_file(f"{out}/model.safetensors").values()),
    "seconds": {"stage0_tiny_model": t_base, "stage1_pretrain": t_pre - t_base, "stage2_align": t_align - t_pre,
                "check": t_check - t_align, "total": t_check, "omp_num_threads": env["OMP_NUM_THREADS"],
                "load_average_at_end": os.getloadavg()[0]},
    "train_loss_per_epoch": {s: meta[s]["epoch_losses"] for s in meta},
    "heldout_metrics": metrics,
}
write_json(f"{out}/lab_model.json", card)
print(json.dumps({k: card[k] for k in ("parameters", "seconds")}, indent=1))
for s, m in metrics.items():
    print(f"{s:>10}: keyword ASR {m['keyword_asr']:.3f}  compliance {m['compliance']:.3f}  "
          f"compliant loss {m['compliant_loss']:.3f} (first 5 tokens {m['compliant_loss_first5']:.3f})")
EOF
du -sh "$OUT"
