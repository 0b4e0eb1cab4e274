"""Fine-tuning on the tiny model: loss goes down, seeds, lr schedule, LoRA, batch plans, torchrun (DDP, FSDP)."""
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, python
from safedata import data as D
from safedata.errors import UserError
from safedata.models import load_model
from safedata.training import (FinetuneArgs, broadcasts_weights, decoder_layer_classes, epoch_decay, finetune,
                               plan_batches, resolve_precision, resolve_save_dtype, trainer_fsdp_arguments)


def write_subset(path, n=20):
    """Placeholder benign records (the test's own text)."""
    styles = ["1. First step.\n2. Second step.", "The answer is 42.", "def f(x):\n    return x + 1",
              "A short story about a cat."]
    records = [{"instruction": f"Question number {i} about topic {i % 3}", "input": "some input" if i % 4 == 0 else "",
                "output": styles[i % 4] * (1 + i % 3)} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    return write_subset(tmp_path_factory.mktemp("subset") / "subset_top20.json")


def config(model, data, out, **kw):
    base = dict(model_name=str(model), data_path=str(data), output_dir=str(out), batch_size=4, epochs=3,
                learning_rate=1e-3, seed=1)
    base.update(kw)
    return FinetuneArgs(**base)


def subset_loss(model_dir, data, template="paper"):
    """Mean loss over all supervised tokens of the subset, one unpadded example at a time."""
    model, tok = load_model(str(model_dir), "fp32", "cpu")
    examples, _ = D.load_examples(data)
    total, count = 0.0, 0
    for e in examples:
        enc = D.encode(e, tok, template)
        ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        mask = target != D.IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
        count += int(mask.sum())
    return total / count


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


@pytest.fixture(scope="module")
def seed1_run(tiny_model_dir, subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "seed1"
    meta = finetune(config(tiny_model_dir, subset, out))
    return out, meta


def test_loss_goes_down_and_checkpoint_is_complete(tiny_model_dir, subset, seed1_run):
    out, meta = seed1_run
    before, after = subset_loss(tiny_model_dir, subset), subset_loss(out, subset)
    assert after < before - 0.3, (before, after)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "finetune_meta.json"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "finetune_meta.json").read_text())
    assert on_disk["data_sha256"] == D.file_sha256(subset) and on_disk["template"] == "paper"
    assert on_disk["n"] == 20 and on_disk["steps_per_epoch"] == 5 and on_disk["total_steps"] == 15
    assert on_disk["effective_batch_size"] == 4 and on_disk["flags"]["seed"] == 1
    losses = on_disk["epoch_losses"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert on_disk["kind"] == "full" and on_disk["save_dtype"] == "float32"
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["dtype"] == "float32" and saved_config["use_cache"] is True  # off only while training
    # The Trainer's logged step losses are the token-mean loss of each batch: the first equals the base model's loss
    # on the first batch, so it must be close to the subset loss before training.
    step_losses = [e["loss"] for e in on_disk["log_history"] if "loss" in e]
    assert len(step_losses) == 15 and abs(step_losses[0] - before) < 0.2


def test_lr_is_multiplied_by_085_each_epoch(seed1_run):
    _, meta = seed1_run
    lrs = {e["step"]: e["learning_rate"] for e in meta["log_history"] if "learning_rate" in e}
    assert sorted(lrs) == list(range(1, 16))
    for step, lr in lrs.items():
        assert lr == pytest.approx(1e-3 * 0.85 ** ((step - 1) // 5), rel=1e-9), step
    assert [epoch_decay(s, 5, 0.85) for s in (0, 4, 5, 9, 10)] == [1.0, 1.0, 0.85, 0.85, 0.85 ** 2]


def test_same_seed_same_weights_other_seed_differs(tiny_model_dir, subset, seed1_run, tmp_path):
    out1, meta1 = seed1_run
    again = finetune(config(tiny_model_dir, subset, tmp_path / "again"))
    other = finetune(config(tiny_model_dir, subset, tmp_path / "other", seed=2))
    w1, w_again, w_other = weights(out1), weights(tmp_path / "again"), weights(tmp_path / "other")
    assert all(torch.equal(w1[k], w_again[k]) for k in w1), "same seed must give bitwise identical weights"
    assert any(not torch.equal(w1[k], w_other[k]) for k in w1)
    # The seed shuffles the data: the first batch (and so the first logged loss) differs.
    first = lambda m: next(e["loss"] for e in m["log_history"] if "loss" in e)
    assert first(meta1) == first(again) and first(meta1) != first(other)


def test_micro_batches_and_accumulation_do_not_change_the_result(tiny_model_dir, subset, seed1_run, tmp_path):
    """The real-model study's fine-tunes rely on it (scripts/lab_real.sh, FT_COMPUTE_FLAGS: micro-batches of one;
    on SmolLM2 the weights ended 1.5e-5 of the update apart, docs/REAL_MODEL.md)."""
    out1, _ = seed1_run
    meta = finetune(config(tiny_model_dir, subset, tmp_path / "accum", per_device_batch_size=1))
    assert meta["gradient_accumulation_steps"] == 4 and meta["per_device_batch_size"] == 1
    w1, w2 = weights(out1), weights(tmp_path / "accum")
    for k in w1:
        # fp32 sums in another order change a gradient in its last bits; where an entry is near zero Adam's
        # normalisation can turn that into a visible step, so the bound is 1% of one Adam step (lr 1e-3):
        # a dropped or doubled micro-batch moves weights by whole steps.
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_changes_memory_not_weights(tiny_model_dir, subset, seed1_run, tmp_path, monkeypatch):
    """--gradient_checkpointing recomputes each decoder layer's forward in the backward pass: the same fp32 ops on
    the same inputs, so the same gradients and weights, bit for bit. (The real-model study relied on it: its kept
    grad-bottom seed 1 run was fine-tuned with the flag, the others without.) Counted calls show the recomputation
    happened."""
    from transformers.models.llama import modeling_llama
    out1, meta1 = seed1_run
    calls = []
    # counted inside the layer (the decoder layer's own forward is where transformers wraps the checkpointing)
    forward = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    meta = finetune(config(tiny_model_dir, subset, tmp_path / "checkpointed", gradient_checkpointing=True))
    steps, layers = meta["total_steps"], 2
    assert len(calls) == 2 * steps * layers       # each layer's forward once more in every backward pass
    w1, w2 = weights(out1), weights(tmp_path / "checkpointed")
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [e["loss"] for e in meta["log_history"] if "loss" in e] == \
        [e["loss"] for e in meta1["log_history"] if "loss" in e]


def test_lora_adapter_and_merge(tiny_model_dir, subset, tmp_path):
    out = tmp_path / "lora"
    meta = finetune(config(tiny_model_dir, subset, out, lora=True, merge_lora=True, lora_r=4, lora_alpha=16,
                           lora_target_modules=["q_proj", "v_proj"]))
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert json.loads((adapter / "finetune_meta.json").read_text())["kind"] == "lora_adapter"
    assert meta["kind"] == "lora_merged" and (out / "model.safetensors").exists()
    lora_weights = load_file(adapter / "adapter_model.safetensors")
    assert lora_weights and all("lora_" in k and ("q_proj" in k or "v_proj" in k) for k in lora_weights)
    config_json = json.loads((adapter / "adapter_config.json").read_text())
    assert config_json["r"] == 4 and config_json["lora_alpha"] == 16
    assert os.path.isabs(config_json["base_model_name_or_path"])

    # The adapter (loaded through transformers' PEFT integration, as generate.py does) and the merged model agree;
    # both differ from the base model; the merged model's non-adapted weights are the base weights.
    x = torch.tensor([[1, 40, 50, 60, 70, 80]])
    adapted, _ = load_model(str(adapter), "fp32", "cpu")
    merged, _ = load_model(str(out), "fp32", "cpu")
    base, _ = load_model(tiny_model_dir, "fp32", "cpu")
    with torch.no_grad():
        la, lm, lb = adapted(x).logits, merged(x).logits, base(x).logits
    torch.testing.assert_close(lm, la, rtol=1e-4, atol=1e-5)
    assert (lm - lb).abs().max() > 1e-3
    wb, wm = weights(tiny_model_dir), weights(out)
    assert torch.equal(wb["model.layers.0.mlp.up_proj.weight"], wm["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(wb["model.layers.0.self_attn.q_proj.weight"], wm["model.layers.0.self_attn.q_proj.weight"])
    assert subset_loss(out, subset) < subset_loss(tiny_model_dir, subset)


def test_batch_plans_and_refusals(tiny_model_dir, subset, seed1_run):
    assert plan_batches(20, None, 1) == (20, 1)
    assert plan_batches(20, None, 4) == (5, 1)
    assert plan_batches(20, 2, 2) == (2, 5)
    with pytest.raises(UserError, match="not divisible"):
        plan_batches(20, None, 3)
    with pytest.raises(UserError, match="not a multiple"):
        plan_batches(20, 3, 1)
    out, _ = seed1_run
    with pytest.raises(UserError, match="already holds a finished fine-tune"):
        finetune(config(tiny_model_dir, subset, out))
    model, _ = load_model(tiny_model_dir, "fp32", "cpu")
    assert decoder_layer_classes(model) == ["LlamaDecoderLayer"]


def test_cli_errors_are_one_line(tiny_model_dir, subset, tmp_path):
    run = subprocess.run([python(), str(ROOT / "finetune.py"), "--model_name", tiny_model_dir, "--data_path",
                          str(subset), "--output_dir", str(tmp_path / "x"), "--batch_size", "20",
                          "--per_device_batch_size", "3"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: --batch_size 20")


def torchrun(nproc, args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [python(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "finetune.py")] + args
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp-flag"])
def test_torchrun_two_processes_match_one(tiny_model_dir, subset, seed1_run, tmp_path, fsdp):
    """2 CPU processes (gloo) x 2 per device = the same effective batch of 4 as the 1-process run.

    accelerate applies FSDP on accelerators only: on CPU, --fsdp runs these processes as DDP, and the meta
    records that FSDP was not applied (the FSDP settings a GPU run gets are tested below)."""
    out1, meta1 = seed1_run
    out = tmp_path / "two"
    torchrun(2, ["--model_name", tiny_model_dir, "--data_path", str(subset), "--output_dir", str(out),
                 "--batch_size", "4", "--epochs", "3", "--lr", "1e-3", "--seed", "1"] + (["--fsdp"] if fsdp else []),
             tmp_path)
    meta = json.loads((out / "finetune_meta.json").read_text())
    assert meta["world_size"] == 2 and meta["per_device_batch_size"] == 2 and meta["compute"]["fsdp"] == fsdp
    assert meta["compute"]["fsdp_applied"] is False and meta["compute"]["weights_broadcast_from_rank0"] is False
    assert meta["total_steps"] == 15
    losses = [e["loss"] for e in meta["log_history"] if "loss" in e]
    losses1 = [e["loss"] for e in meta1["log_history"] if "loss" in e]
    assert losses == pytest.approx(losses1, abs=1e-5)
    w1, w2 = weights(out1), weights(out)
    assert set(w1) == set(w2)
    for k in w1:
        # fp32 sums in another order change a gradient in its last bits; where an entry is near zero Adam's
        # normalisation can turn that into a visible step, so the bound is 1% of one Adam step (lr 1e-3):
        # a dropped or doubled micro-batch moves weights by whole steps.
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5)


def test_gpu_defaults_are_the_papers_pure_bf16():
    assert resolve_precision("auto", cuda=True) == ("bf16", False)       # bf16 weights, no autocast: pure bf16
    assert resolve_precision("bf16", cuda=True) == ("fp32", True)        # fp32 master weights + bf16 autocast
    assert resolve_precision("auto", cuda=False) == ("fp32", False)
    assert resolve_save_dtype("auto", "auto", cuda=True) == torch.bfloat16
    assert resolve_save_dtype("auto", "auto", cuda=False) == torch.float32


def test_fsdp_settings_a_gpu_run_gives_the_trainer(tiny_model_dir, subset, tmp_path):
    from transformers import TrainingArguments
    full = config(tiny_model_dir, subset, tmp_path / "x", fsdp=True)
    assert broadcasts_weights(full, processes=2, cuda=True)
    assert not broadcasts_weights(full, processes=1, cuda=True)
    assert not broadcasts_weights(config(tiny_model_dir, subset, tmp_path / "x", fsdp=True, lora=True), 2, True)
    assert not broadcasts_weights(config(tiny_model_dir, subset, tmp_path / "x"), 2, True)
    # The settings go through transformers' own parsing into accelerate's FSDP plugin arguments.
    args = TrainingArguments(output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none",
                             **trainer_fsdp_arguments(full, ["LlamaDecoderLayer"], True))
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["cpu_ram_efficient_loading"] is True
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer" and plugin["reshard_after_forward"] is True
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING") == "true"
    os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING")


def test_ranks_other_than_0_build_the_model_without_reading_weights(tiny_model_dir):
    """What a non-zero FSDP rank holds before rank 0's weights arrive: parameters on the meta device, real
    buffers (RoPE frequencies), and a state dict rank 0's fills in exactly."""
    from safedata.training import _empty_model
    empty = _empty_model(tiny_model_dir, "fp32")
    loaded, _ = load_model(tiny_model_dir, "fp32", "cpu")
    assert all(p.device.type == "meta" for p in empty.parameters())
    buffers = dict(loaded.named_buffers())
    assert buffers and all(torch.equal(b, buffers[name]) for name, b in empty.named_buffers())
    empty.load_state_dict(loaded.state_dict(), assign=True)
    x = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        assert torch.equal(empty.eval()(x).logits, loaded(x).logits)


def test_rerun_keeps_same_settings_and_names_other_settings(tiny_model_dir, subset, seed1_run, tmp_path):
    out, meta = seed1_run
    weights_before = (out / "model.safetensors").stat().st_mtime_ns
    kept = finetune(config(tiny_model_dir, subset, out, reuse_if_same=True))
    assert kept["train_loss"] == meta["train_loss"] and (out / "model.safetensors").stat().st_mtime_ns == weights_before
    with pytest.raises(UserError, match=r"other settings \(learning_rate: recorded 0\.001, requested 0\.002\)"):
        finetune(config(tiny_model_dir, subset, out, reuse_if_same=True, learning_rate=2e-3))
    with pytest.raises(UserError, match=r"epochs: recorded 3, requested 4; learning_rate: recorded 0\.001"):
        finetune(config(tiny_model_dir, subset, out, reuse_if_same=True, learning_rate=2e-3, epochs=4))
    changed = tmp_path / subset.name
    changed.write_text(subset.read_text().replace("topic 1", "topic one"))
    with pytest.raises(UserError, match=r"other settings \(subset content \(sha256\): recorded [0-9a-f]+, requested"):
        finetune(config(tiny_model_dir, changed, out, reuse_if_same=True))
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_before


def test_rerun_from_moved_model_subset_and_run_keeps_the_run(tiny_model_dir, subset, seed1_run, tmp_path):
    """Identity is content: the same base model, subset and run at other paths (a project moved or checked out
    again) keep the finished fine-tune; the paths are recorded for a person only."""
    out, meta = seed1_run
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model_dir, moved / "base")
    shutil.copy(subset, moved / "subset.json")
    shutil.copytree(out, moved / "run")
    weights = (moved / "run" / "model.safetensors").stat().st_mtime_ns
    kept = finetune(config(str(moved / "base"), moved / "subset.json", moved / "run", reuse_if_same=True))
    assert kept["train_loss"] == meta["train_loss"]
    assert (moved / "run" / "model.safetensors").stat().st_mtime_ns == weights


def test_fewer_examples_than_the_batch_says_so(tiny_model_dir, tmp_path, caplog):
    small = write_subset(tmp_path / "five.json", n=5)
    with caplog.at_level("WARNING", logger="safedata.training"):
        meta = finetune(config(tiny_model_dir, small, tmp_path / "ft", batch_size=20, epochs=1))
    assert meta["total_steps"] == 1
    assert "5 example(s) for an effective batch of 20: each epoch is a single optimizer step" in caplog.text


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with tied input/output embeddings (as SmolLM2, Llama-3.2, Qwen2.5-0.5B)."""
    from transformers import AutoModelForCausalLM
    out = tmp_path_factory.mktemp("tied") / "model"
    model, tokenizer = load_model(tiny_model_dir, "fp32", "cpu")
    model.config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(model.config)
    tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    tied.tie_weights()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    tied.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def test_a_cpu_checkpoint_is_saved_as_help_says_tied_once_and_readable_by_others(tied_model_dir, subset, tmp_path):
    """--precision bf16 on CPU: fp32 weights (the help: auto saves fp32 on CPU); a tied embedding written once
    (as save_pretrained writes the uncast model); files with the user's umask, not temporary-file modes."""
    from safetensors import safe_open
    out = tmp_path / "bf16"
    finetune(config(tied_model_dir, subset, out, precision="bf16", epochs=1))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        dtypes = {f.get_tensor(n).dtype for n in names}
    with safe_open(str(tied_model_dir / "model.safetensors"), "pt") as f:
        base_names = list(f.keys())
    assert dtypes == {torch.float32}
    assert sorted(names) == sorted(base_names) and "lm_head.weight" not in names
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json", "finetune_meta.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    # an explicit bf16 save casts, keeping the tie
    out16 = tmp_path / "save16"
    finetune(config(tied_model_dir, subset, out16, precision="bf16", epochs=1, save_dtype="bf16"))
    with safe_open(str(out16 / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert {f.get_tensor(n).dtype for n in f.keys()} == {torch.bfloat16}
    reloaded, _ = load_model(str(out16), "fp32", "cpu")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_a_lora_run_logs_no_peft_future_warning(tiny_model_dir, subset, tmp_path):
    """peft read transformers' deprecated is_gradient_checkpointing on every LoRA run (a FutureWarning line in
    every job log); other warnings still show."""
    done = subprocess.run([python(), str(ROOT / "finetune.py"), "--model_name", tiny_model_dir, "--data_path",
                           str(subset), "--output_dir", str(tmp_path / "lora"), "--lora", "--epochs", "1",
                           "--batch_size", "20"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FutureWarning" not in done.stderr and "is_gradient_checkpointing" not in done.stderr


class Crash(Exception):
    """What a kill does to a run: it stops between two steps, with what was on disk then."""


def crash_at_step(monkeypatch, step):
    from transformers import Trainer
    original = Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step:
            raise Crash(step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)


def test_a_stopped_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_ends(
        tiny_model_dir, subset, seed1_run, tmp_path, monkeypatch):
    """seed1_run: 15 steps (20 examples, batch 4, 3 epochs) without a stop. Here the same settings with a checkpoint
    after every step, stopped before step 8 (in the second epoch), then run again: it resumes at step 7 and ends with
    the same weights, step losses and train loss; the checkpoints are gone. Checkpoints of other settings are never
    resumed from."""
    out1, meta1 = seed1_run
    out = tmp_path / "stopped"
    every_step = 1e-9   # minutes
    with monkeypatch.context() as patch:
        crash_at_step(patch, 7)
        with pytest.raises(Crash):
            finetune(config(tiny_model_dir, subset, out, checkpoint_minutes=every_step))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-7"]   # the latest kept
    assert not (out / "finetune_meta.json").exists()

    meta = finetune(config(tiny_model_dir, subset, out, checkpoint_minutes=every_step))
    assert meta["resumed_from_step"] == 7 and meta["total_steps"] == 15
    assert not list(out.glob("checkpoint-*")) and not (out / "resume_settings.json").exists()
    # The resumed steps replay the same batches with the restored optimizer, schedule and RNG: the same numbers
    # as the run that never stopped (compared exactly; a wrong data position or a lost optimizer state moves the
    # losses and weights by whole steps).
    losses = [e["loss"] for e in meta["log_history"] if "loss" in e]
    assert losses == [e["loss"] for e in meta1["log_history"] if "loss" in e]
    w1, w2 = weights(out1), weights(out)
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert meta["train_loss"] == pytest.approx(meta1["train_loss"], rel=1e-12)
    # how often a run checkpoints is not a setting of its result
    assert {k: v for k, v in meta["flags"].items() if k != "output_dir"} == \
        {k: v for k, v in meta1["flags"].items() if k != "output_dir"}

    other = tmp_path / "other"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 4)
        with pytest.raises(Crash):
            finetune(config(tiny_model_dir, subset, other, checkpoint_minutes=every_step, learning_rate=2e-3))
    meta = finetune(config(tiny_model_dir, subset, other, checkpoint_minutes=every_step))
    assert "resumed_from_step" not in meta and not list(other.glob("checkpoint-*"))
    w3 = weights(other)
    assert all(torch.equal(w1[k], w3[k]) for k in w1)


def test_a_stopped_lora_run_resumes_to_the_same_adapter(tiny_model_dir, subset, tmp_path, monkeypatch):
    """The same for a LoRA run (the checkpoint holds the adapter, not the base weights): an uninterrupted run and
    one stopped before step 6 and run again write the same adapter, bit for bit."""
    lora = dict(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, checkpoint_minutes=1e-9)
    finetune(config(tiny_model_dir, subset, tmp_path / "whole", **lora))
    with monkeypatch.context() as patch:
        crash_at_step(patch, 5)
        with pytest.raises(Crash):
            finetune(config(tiny_model_dir, subset, tmp_path / "stopped", **lora))
    meta = finetune(config(tiny_model_dir, subset, tmp_path / "stopped", **lora))
    assert meta["resumed_from_step"] == 5
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
