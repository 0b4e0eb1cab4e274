"""--plan: memory from the config alone, against docs/MEMORY.md's 7B figures and against measured peaks on CPU."""
import functools
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, python
from safedata import data as D
from safedata import plan as P

# Llama-2-7B's public configuration (meta-llama/Llama-2-7b-hf, config.json), written here: no download.
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}


@pytest.fixture(scope="module")
def llama7b_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama7b") / "config.json"   # a config and nothing else: no weights to read
    path.write_text(json.dumps(LLAMA2_7B))
    return path


def run_plan(script, *args):
    run = subprocess.run([python(), str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = dict(re.findall(r"^  (\S.*?)\s+(\d+\.\d+) GB", run.stdout, flags=re.M))
    return {k.strip(): float(v) * 1e9 for k, v in rows.items()}, run.stdout


def test_llama2_7b_plan_prints_the_readme_figures(llama7b_config):
    # docs/MEMORY.md, "What a 7B model needs": 13.5 GB of bf16 weights; ~5 GB per factored target for the paper's
    # 10 anchors (~100 tokens each, 10 supervised), ~15 GB for three targets.
    rows, text = run_plan("get_gradients.py", "--model_name", str(llama7b_config), "--targets", "h", "s1", "s2",
                          "--batch_size", "2", "--device", "cuda", "--plan")
    assert "6.738 B parameters" in text
    assert rows["weights"] == pytest.approx(13.5e9, rel=0.05)
    assert rows["targets"] == pytest.approx(15e9, rel=0.05)
    one, _ = run_plan("get_gradients.py", "--model_name", str(llama7b_config), "--anchor", "--device", "cuda", "--plan")
    assert one["targets"] == pytest.approx(5e9, rel=0.05)
    # Full fine-tuning with fp32 master weights (+ fp32 gradients and AdamW's two moments): 16 bytes a parameter,
    # ~108 GB before activations (docs/PIPELINE.md, fine-tuning). The paper's pure bf16 halves it, FSDP over 2 GPUs halves again.
    mixed, _ = run_plan("finetune.py", "--model_name", str(llama7b_config.parent), "--precision", "bf16", "--plan")
    assert mixed["weights"] + mixed["gradients"] + mixed["AdamW state"] == pytest.approx(108e9, rel=0.05)
    paper, text = run_plan("finetune.py", "--model_name", str(llama7b_config), "--fsdp", "--plan", "nproc=2")
    assert "precision=pure_bf16" in text and "per-device batch=10" in text
    assert paper["weights"] + paper["gradients"] + paper["AdamW state"] == pytest.approx(108e9 / 4, rel=0.05)
    assert paper["per-device total"] < 80e9 < mixed["per-device total"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans the CPU run: auto precision without a GPU")
def test_finetune_plan_on_cpu_plans_the_fp32_run_it_will_do(llama7b_config):
    # finetune.py on CPU resolves --precision auto to fp32 (4-byte weights and gradients, 8 bytes of AdamW
    # moments); the plan used to print the GPU's pure bf16 (2 + 2 + 4 bytes). --fsdp runs shard on GPUs only, so
    # their plan stays the GPU run's.
    rows, text = run_plan("finetune.py", "--model_name", str(llama7b_config), "--plan")
    assert "precision=fp32" in text
    assert rows["weights"] == pytest.approx(6.738e9 * 4, rel=0.01)
    assert rows["weights"] + rows["gradients"] + rows["AdamW state"] == pytest.approx(6.738e9 * 16, rel=0.01)
    _, fsdp = run_plan("finetune.py", "--model_name", str(llama7b_config), "--fsdp", "--plan", "nproc=2")
    assert "precision=pure_bf16" in fsdp


def plan_in_process(script, *args, monkeypatch, capsys):
    """run_plan's rows and text, from the CLI's main() in this process (no interpreter start: seconds less)."""
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", [script, *args])
        module.main()
    text = capsys.readouterr().out
    rows = dict(re.findall(r"^  (\S.*?)\s+(\d+\.\d+) GB", text, flags=re.M))
    return {k.strip(): float(v) * 1e9 for k, v in rows.items()}, text


def test_plan_names_its_device_and_dtype_and_plans_a_gpu_run_from_a_machine_without_one(llama7b_config, monkeypatch,
                                                                                       capsys):
    run_plan = functools.partial(plan_in_process, monkeypatch=monkeypatch, capsys=capsys)
    # --plan device=cuda (words, as on a login node) gives the GPU run's figures whether or not a GPU is visible
    # here: pure bf16, 8 bytes a parameter, FSDP shards them over 2 (108 GB / 4 for weights + gradients + AdamW).
    rows, text = run_plan("finetune.py", "--model_name", str(llama7b_config), "--plan", "device=cuda", "nproc=2",
                          "--fsdp")
    first = text.splitlines()[0]
    assert "device=cuda" in first and "dtype=bf16" in first, first
    assert "precision=pure_bf16" in text and "fsdp=True" in text
    assert rows["weights"] == pytest.approx(13.5e9 / 2, rel=0.05)
    assert rows["weights"] + rows["gradients"] + rows["AdamW state"] == pytest.approx(108e9 / 4, rel=0.05)
    one, text = run_plan("finetune.py", "--model_name", str(llama7b_config), "--plan", "device=cuda")
    assert one["weights"] == pytest.approx(13.5e9, rel=0.05)      # docs/MEMORY.md: 13.5 GB of bf16 weights
    grads, text = run_plan("get_gradients.py", "--model_name", str(llama7b_config), "--plan", "device=cuda,nproc=2")
    assert text.splitlines()[0].startswith("plan for device=cuda, dtype=bf16")
    assert grads["weights"] == pytest.approx(13.5e9, rel=0.05)
    reps, text = run_plan("get_representation.py", "--model_name", str(llama7b_config), "--device", "cuda", "--plan")
    assert text.splitlines()[0].startswith("plan for device=cuda, dtype=bf16; device: --device cuda")
    assert reps["weights"] == pytest.approx(13.5e9, rel=0.05)
    if not torch.cuda.is_available():     # plain --plan here plans the CPU run, and says so on its first line
        cpu, text = run_plan("finetune.py", "--model_name", str(llama7b_config), "--plan")
        first = text.splitlines()[0]
        assert "device=cpu" in first and "dtype=fp32" in first and "--plan device=cuda" in first, first
        assert cpu["weights"] == pytest.approx(6.738e9 * 4, rel=0.01)
        cpu, text = run_plan("get_gradients.py", "--model_name", str(llama7b_config), "--plan")
        assert text.splitlines()[0].startswith("plan for device=cpu, dtype=fp32")
        assert cpu["weights"] == pytest.approx(6.738e9 * 4, rel=0.01)


def test_plan_settings_and_bad_input_are_one_line(llama7b_config, tmp_path):
    for args, message in ((["--plan", "colour=3"], "expected KEY=VALUE with KEY one of"),
                          (["--plan", "length=abc"], "length must be a number"),
                          (["--plan", "device=tpu"], "device must be one of cuda, cpu")):
        run = subprocess.run([python(), str(ROOT / "get_representation.py"), "--model_name", str(llama7b_config),
                              *args], capture_output=True, text=True)
        assert run.returncode == 2 and "Traceback" not in run.stderr and message in run.stderr
    run = subprocess.run([python(), str(ROOT / "finetune.py"), "--model_name", str(tmp_path / "nothing"), "--plan"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == f"error: --model_name {tmp_path / 'nothing'}: no such file or directory"
    short, _ = run_plan("get_representation.py", "--model_name", str(llama7b_config), "--plan", "length=256")
    long, _ = run_plan("get_representation.py", "--model_name", str(llama7b_config), "--plan", "length=1024")
    assert long["activations"] == pytest.approx(4 * short["activations"], rel=0.005) and long["weights"] == short["weights"]


def test_lora_plan_counts_what_peft_trains(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from safedata.models import load_model
    model, _ = load_model(tiny_model_dir, "fp32", "cpu")
    base_params = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    plan = P.plan_finetune(P.model_shape(tiny_model_dir), 2, 16, "fp32", lora=True, lora_r=4)
    assert plan.get("LoRA params + grads + AdamW") == 16 * trainable
    assert plan.get("weights") == 4 * base_params


# ----------------------------------------------------------------------------- measured peaks on CPU

MEASURE = r"""
import json, os, runpy, sys
root, script, *args = sys.argv[1:]
sys.path.insert(0, root)
import torch, transformers, transformers.trainer, peft, safedata.training, safedata.features.gradients
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so a child of a large pytest process would start
# with the parent's peak as its own and understate its growth; VmHWM belongs to this process's memory map.
def high_water():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
base = high_water()
sys.argv = [script, *args]
runpy.run_path(os.path.join(root, script), run_name="__main__")
print(json.dumps({"grown": high_water() - base}))
"""


@pytest.fixture(scope="module")
def measured_setup(tmp_path_factory):
    """A model large enough that its memory dwarfs the interpreter's noise, and examples of one length."""
    from safedata.models import load_tokenizer, make_tiny_model
    base = tmp_path_factory.mktemp("plan")
    model = make_tiny_model(base / "model", hidden_size=256, num_layers=4, num_heads=4, vocab_size=1024, seed=0)
    pool = base / "pool.json"
    pool.write_text(json.dumps([{"instruction": "Describe the garden in spring", "input": "",
                                 "output": "The garden is green and the birds sing. " * 12}] * 20))
    tok = load_tokenizer(str(model))
    # Four distinct anchors of one token length (which words tokenise to one piece depends on the tokenizer).
    requests = [f"Placeholder request about the garden, part {part}" for part in "abcdefghijklmnopqrstuvwxyz"]
    by_length = {}
    for request in requests:
        by_length.setdefault(len(tok(request, add_special_tokens=False).input_ids), []).append(request)
    requests = max(by_length.values(), key=len)[:4]
    assert len(requests) == 4, by_length
    anchors = base / "anchors.json"
    anchors.write_text(json.dumps([{"messages": [
        {"role": "user", "content": request},
        {"role": "assistant", "content": "Sure, here is a placeholder answer with some steps. " * 3}]}
        for request in requests]))
    length = {len(D.encode(e, tok).input_ids) for e in D.load_examples(pool)[0]}
    anchor_tokens = {len(D.encode(e, tok, max_response_length=10).input_ids) for e in D.load_examples(anchors)[0]}
    assert len(length) == 1 and len(anchor_tokens) == 1
    return base, model, pool, anchors, length.pop(), anchor_tokens.pop()


def measure(script, *args):
    """Peak RSS growth of one run of a script, in a fresh process. glibc's dynamic mmap threshold would keep
    freed activation blocks in the heap and count them again; a fixed threshold makes RSS follow live memory."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run([python(), "-c", MEASURE, str(ROOT), script, *args], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["grown"]


def test_tiny_model_plans_are_within_25_percent_of_measured_cpu_peaks(measured_setup):
    base, model, pool, anchors, length, anchor_tokens = measured_setup
    shape = P.model_shape(str(model))
    checks = {}
    grown = measure("finetune.py", "--model_name", str(model), "--data_path", str(pool), "--output_dir",
                    str(base / "ft"), "--batch_size", "20", "--epochs", "1")
    checks["finetune"] = (grown, P.plan_finetune(shape, 20, length, "fp32").total)

    target = base / "target"
    subprocess.run([python(), str(ROOT / "get_gradients.py"), "--anchor", "--model_name", str(model), "--data_path",
                    str(anchors), "--output_dir", str(target), "--max_response_length", "10"], check=True,
                   capture_output=True)
    grown = measure("get_gradients.py", "--model_name", str(model), "--data_path", str(pool), "--output_dir",
                    str(base / "scores"), "--targets", str(target), str(target), str(target), "--batch_size", "20")
    checks["gradients"] = (grown, P.plan_gradients(shape, 20, length, 4, n_targets=3, anchors=4,
                                                    anchor_tokens=anchor_tokens, response_tokens=10,
                                                    device="cpu").total)

    grown = measure("get_representation.py", "--model_name", str(model), "--data_path", str(pool), "--output_dir",
                    str(base / "reps"), "--batch_size", "20")
    checks["representations"] = (grown, P.plan_representations(shape, 20, length, 4, device="cpu").total)
    for stage, (measured, planned) in checks.items():
        assert planned == pytest.approx(measured, rel=0.25), (stage, measured / 1e6, planned / 1e6)
    assert checks["finetune"][0] > 4 * checks["representations"][0]   # the measurement sees what the plans see
