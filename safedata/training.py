"""Fine-tune a causal LM on a selected subset with the Hugging Face Trainer (full or LoRA).

The paper's recipe is the default: AdamW, lr 5e-5 multiplied by 0.85 after every epoch,
5 epochs, an effective batch of 20 examples, no weight decay, no gradient clipping.
Examples are encoded by `data.encode` (the same templates and masks as the feature
stages) and padded per batch by `data.collate`; the loss is the mean over all supervised
tokens of the effective batch (the Trainer's `num_items_in_batch`), so padding, micro-batch
size and the number of processes leave it unchanged.

Precision on a GPU (`precision="auto"`) is the paper's pure bf16: weights, gradients and AdamW
state all in bf16 (8 bytes a parameter: 54 GB for a 7B model, 27 GB per GPU under FSDP on 2).
`precision="bf16"` keeps fp32 master weights with bf16 autocast (16 bytes a parameter, ~108 GB for
7B before activations); on CPU, auto is fp32. `--plan` prints the per-GPU memory of a setting.

Multi-GPU: launch under `torchrun`; `fsdp=True` shards parameters, gradients and optimizer
state (FSDP2 through the Trainer/accelerate, full shard, one unit per decoder layer found from
`model._no_split_modules`). Weights are read once: rank 0 loads the checkpoint, the other ranks build
the model on the meta device (accelerate's `init_empty_weights`) and receive their shards from rank 0
(accelerate's `cpu_ram_efficient_loading`). Without FSDP, several processes run DDP (gloo on CPU,
nccl on GPU).

A finished fine-tune records its settings (flags, the subset's sha256, the base model's identity) in
`finetune_meta.json`; `reuse_if_same` keeps it when a rerun asks for exactly those settings and
refuses, naming the differences, when it asks for others (`overwrite` replaces it).

Output: a standard Hugging Face checkpoint (safetensors + config + tokenizer) or, with LoRA,
the adapter (`merge_lora` also writes the merged full model), plus `finetune_meta.json`,
written last: its presence means the checkpoint is complete.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from . import data as D
from .config import LoraArgs, StageArgs, module_names, option, shared
from .distributed import launched_world_size
from .errors import UserError
from .models import DTYPES, FINETUNE_META, load_model, load_tokenizer, model_identity, read_finetune_meta
from .store import apply_umask, environment, model_key, now, read_json, write_json
from .templates import choose_template

log = logging.getLogger(__name__)

META_NAME = FINETUNE_META
ADAPTER_DIR = "adapter"
PRECISIONS = ("auto", "bf16", "pure_bf16", "fp32")
# Settings that say where and how a run is written, not what it computes: left out of the rerun comparison. The
# base model and the subset are compared by content (base_model, data_sha256), so their paths are left out too.
NOT_SETTINGS = ("output_dir", "overwrite", "reuse_if_same", "checkpoint_minutes", "model_name", "data_path")
# How often a run saves a checkpoint changes nothing it computes: not recorded in finetune_meta.json's flags.
NOT_RECORDED = ("checkpoint_minutes",)
RESUME_FILE = "resume_settings.json"    # OUTPUT_DIR/: the settings the checkpoint-STEP dirs there were made with
LOSS_SUM_FILE = "loss_sum.json"         # in a checkpoint dir: the sum of the step losses up to it
SAVE_DTYPES = ("auto", "bf16", "fp16", "fp32")


OPTIMISATION = "optimisation (defaults: the paper)"
LORA = "LoRA"


@dataclass(kw_only=True)
class FinetuneArgs:
    """Everything that determines a fine-tuned checkpoint (recorded verbatim in finetune_meta.json); finetune.py's
    flags are generated from these fields. The run maps them onto transformers' TrainingArguments
    (training_arguments), the way TRL's SFTConfig extends them, with the paper's defaults."""

    model_name: str = option(help="Hugging Face id or local directory")
    data_path: str = option(help=f"the subset: records with responses, {D.INPUT_TYPES}")
    output_dir: str = option(help="where the fine-tuned model (or LoRA adapter) and finetune_meta.json go")
    template: str | None = shared(StageArgs, "template")
    max_length: int | None = shared(StageArgs, "max_length")
    learning_rate: float = option(5e-5, "AdamW learning rate (the paper: 5e-5)", flags=("--lr", "--learning_rate"),
                                  group=OPTIMISATION)
    epochs: int = option(5, "passes over the subset (the paper: 5)", group=OPTIMISATION)
    batch_size: int = option(20, "effective batch: per-device batch x gradient accumulation x processes",
                             group=OPTIMISATION)
    per_device_batch_size: int | None = option(
        None, "micro-batch per process (default: batch_size / processes); accumulation makes up the rest",
        group=OPTIMISATION)
    lr_decay: float = option(0.85, "lr multiplied by this after every epoch (the paper's StepLR, gamma 0.85)",
                             group=OPTIMISATION)
    weight_decay: float = option(0.0, "AdamW weight decay (the paper: 0)", group=OPTIMISATION)
    max_grad_norm: float = option(0.0, "gradient clipping; 0 = off (the paper)", group=OPTIMISATION)
    adam_beta1: float = option(0.9, cli=False)
    adam_beta2: float = option(0.999, cli=False)
    adam_epsilon: float = option(1e-8, cli=False)
    seed: int = option(42, "initialisation of the run and order of the data", group=OPTIMISATION)
    precision: str = option(
        "auto", "auto: pure_bf16 on GPU (the paper's setting), fp32 on CPU; pure_bf16: bf16 weights, gradients and "
                "optimizer state (the paper's --pure_bf16); bf16: fp32 master weights with bf16 autocast (twice "
                "the memory); fp32", choices=PRECISIONS, group=OPTIMISATION)
    save_dtype: str = option("auto", "dtype of the saved weights (auto: fp32 on CPU and with --precision fp32, else "
                                     "bf16)", choices=SAVE_DTYPES, group=OPTIMISATION)
    lora: bool = option(False, "train a LoRA adapter instead of all parameters", group=LORA)
    lora_r: int = shared(LoraArgs, "lora_r", "--lora", group=LORA)
    lora_alpha: float = shared(LoraArgs, "lora_alpha", "--lora", group=LORA)
    lora_dropout: float = option(0.05, "--lora: dropout of the adapter's input", group=LORA)
    lora_target_modules: list[str] = shared(LoraArgs, "lora_target_modules", "--lora", group=LORA)
    merge_lora: bool = option(False, "also write the merged full model to --output_dir (the adapter goes to "
                                     "OUTPUT_DIR/adapter)", group=LORA)
    fsdp: bool = option(False, "shard the model over the torchrun processes (FSDP full shard, one unit per decoder "
                               "layer)")
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in the backward pass (less "
                                                 "memory, more time)", group=OPTIMISATION)
    group_by_length: bool = option(False, "batches of examples of similar length, in random order (less padding, "
                                          "so faster on mixed lengths; the paper shuffles without it)",
                                   group=OPTIMISATION)
    skip_bad: bool = option(False, "skip (count and log) bad records instead of stopping")
    overwrite: bool = option(False, "replace a finished fine-tune in --output_dir")
    reuse_if_same: bool = option(
        False, "if --output_dir holds a finished fine-tune made with exactly these settings (flags, subset content, "
               "base model), keep it and exit; one made with other settings is refused, naming the differences "
               "(the SLURM job's reruns use this)")
    field_map: str | None = shared(StageArgs, "field_map")
    checkpoint_minutes: float = option(
        30.0, "every this many minutes, a resumable checkpoint (weights, optimizer, lr schedule, RNG, data position) "
              "in OUTPUT_DIR/checkpoint-STEP, the latest kept; a rerun with the same settings continues from it "
              "(after a kill, a time limit, a preemption) and ends where an uninterrupted run ends; the checkpoints "
              "are removed when the run finishes; 0 = never")

    def __post_init__(self):
        self.lora_target_modules = module_names(self.lora_target_modules)


# ----------------------------------------------------------------------------- pieces


class SubsetDataset(torch.utils.data.Dataset):
    """Encoded examples as dicts of token lists; the collator pads them."""

    def __init__(self, encoded: list[D.Encoded]):
        self.encoded = encoded

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        item = self.encoded[i]
        return {"input_ids": item.input_ids, "labels": item.labels}


class Collator:
    """data.collate (right padding to the longest item, padded positions masked and unsupervised)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        items = [D.Encoded(0, "", f["input_ids"], f["labels"]) for f in features]
        return D.collate(items, self.pad_id, "right")


def epoch_decay(step: int, steps_per_epoch: int, decay: float) -> float:
    """The lr factor at optimizer step `step` (0-based): decay ** epoch."""
    return decay ** (step // steps_per_epoch)


def plan_batches(batch_size: int, per_device: int | None, processes: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation) so that per_device x accumulation x processes = batch_size."""
    if batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    if per_device is None:
        if batch_size % processes:
            raise UserError(f"--batch_size {batch_size} is not divisible by the {processes} processes; "
                            "choose --per_device_batch_size so that per_device x accumulation x processes = batch_size")
        per_device = batch_size // processes
    if per_device < 1:
        raise UserError("--per_device_batch_size must be at least 1")
    if batch_size % (per_device * processes):
        raise UserError(f"--batch_size {batch_size} is not a multiple of --per_device_batch_size {per_device} x "
                        f"{processes} process(es)")
    return per_device, batch_size // (per_device * processes)


def decoder_layer_classes(model) -> list[str]:
    """The classes FSDP wraps one by one: the model's own `_no_split_modules` (LlamaDecoderLayer, ...)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in names if n in present]
    if not names:
        raise UserError(f"--fsdp: {type(model).__name__} declares no decoder layer class (_no_split_modules)")
    return names


def precision_name(precision: str, cuda: bool) -> str:
    """--precision with auto resolved: the paper's pure bf16 on GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "pure_bf16" if cuda else "fp32"
    return precision


def resolve_precision(precision: str, cuda: bool) -> tuple[str, bool]:
    """(dtype to load the weights in, bf16 autocast?)"""
    precision = precision_name(precision, cuda)
    if precision == "bf16":
        return "fp32", True           # fp32 master weights, bf16 compute
    if precision == "pure_bf16":
        return "bf16", False          # bf16 weights, gradients and optimizer state (the paper's --pure_bf16)
    return "fp32", False


def resolve_save_dtype(save_dtype: str, precision: str, cuda: bool) -> torch.dtype:
    if save_dtype not in SAVE_DTYPES:
        raise UserError(f"--save_dtype {save_dtype!r}: choose from {', '.join(SAVE_DTYPES)}")
    if save_dtype == "auto":
        # what --help states: fp32 on CPU (whatever the compute precision) and for --precision fp32, else bf16
        return torch.float32 if precision == "fp32" or not cuda else torch.bfloat16
    return DTYPES[save_dtype]


def _make_trainer_class():

    class SafeDataTrainer(Trainer):
        """The Trainer with the paper's per-epoch lr decay and a chosen dtype for saved weights."""

        def __init__(self, *args, lr_decay=0.85, num_epochs=1, save_dtype=None, resumed_loss_sum=0.0, **kwargs):
            self.lr_decay = lr_decay
            self.num_epochs = num_epochs
            self.save_dtype = save_dtype
            self.steps_per_epoch = None
            self.resumed_loss_sum = resumed_loss_sum     # the step losses before the checkpoint resumed from
            self._saving_checkpoint = False
            super().__init__(*args, **kwargs)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                optimizer = optimizer if optimizer is not None else self.optimizer
                # The Trainer runs ceil(epochs x update steps per epoch) steps; epochs are whole numbers here.
                self.steps_per_epoch = max(1, num_training_steps // self.num_epochs)
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, functools.partial(epoch_decay, steps_per_epoch=self.steps_per_epoch,
                                                 decay=self.lr_decay))
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def _save_checkpoint(self, model, trial):
            # A checkpoint keeps the training weights as they are (no cast: the run resumes from them exactly)
            # and the sum of the step losses so far (the Trainer's own train loss counts one process's steps).
            self._saving_checkpoint = True
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._saving_checkpoint = False
            if self.args.should_save:
                directory = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                write_json(directory / LOSS_SUM_FILE, {"step": self.state.global_step,
                                                       "loss_sum": self.resumed_loss_sum + self._total_loss_scalar})
                log.info("checkpoint %s (resumable: rerun the same command)", directory)

        def _save(self, output_dir=None, state_dict=None):
            if self._saving_checkpoint:
                return super()._save(output_dir, state_dict)
            unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if getattr(unwrapped, "config", None) is not None:
                unwrapped.config.use_cache = True  # off for training only; generation wants the KV cache
            if self.save_dtype is not None and self.args.should_save and not isinstance(unwrapped, PeftModel):
                if state_dict is None:
                    state_dict = unwrapped.state_dict()
                state_dict = cast_keeping_ties(state_dict, self.save_dtype)
            super()._save(output_dir, state_dict)

    class TimedCheckpoints(TrainerCallback):
        """A checkpoint every `seconds` of training (after the step that crosses it). Under torchrun every process
        takes rank 0's decision, so that all of them save the same step (saving is collective under FSDP)."""

        def __init__(self, seconds: float):
            self.seconds = seconds
            self.last = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            due = torch.tensor([float(time.monotonic() - self.last >= self.seconds)], device=args.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(due, src=0)
            if due.item() and state.global_step < state.max_steps:   # the last step saves the model itself
                control.should_save = True
                self.last = time.monotonic()
            return control

    return SafeDataTrainer, TimedCheckpoints


def _checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def checkpoint_to_resume(out: Path, requested: dict) -> Path | None:
    """The latest complete checkpoint in OUTPUT_DIR made with these settings (its loss_sum.json, written after
    everything the Trainer saves, marks it complete), or None. Checkpoints made with other settings are removed (by rank 0), never
    resumed from."""
    checkpoints = sorted((p for p in out.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()),
                         key=_checkpoint_step)
    if not checkpoints:
        return None
    recorded = read_json(out / RESUME_FILE) if (out / RESUME_FILE).exists() else None
    if recorded is None or settings_differences({"settings": recorded}, json.loads(json.dumps(requested))):
        log.warning("%s: checkpoints of a run with other settings (%s); starting again", out,
                    "; ".join(settings_differences({"settings": recorded}, requested)) if recorded else
                    f"no {RESUME_FILE}")
        if int(os.environ.get("RANK", "0")) == 0:
            remove_checkpoints(out)
        return None
    complete = [p for p in checkpoints if (p / LOSS_SUM_FILE).exists()]
    if not complete:
        return None
    log.info("%s: resuming from %s (%d checkpoint(s) there)", out, complete[-1].name, len(checkpoints))
    return complete[-1]


def remove_checkpoints(out: Path) -> None:
    for path in out.glob("checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)
    (out / RESUME_FILE).unlink(missing_ok=True)


def cast_keeping_ties(state_dict: dict, dtype: torch.dtype) -> dict:
    """Floating tensors cast to dtype; tensors that share storage (tied embeddings) stay one tensor, so that
    save_pretrained writes them once, as it does for the uncast model."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state_dict.items():
        if not torch.is_floating_point(tensor):
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key not in cast:
            cast[key] = tensor.to(dtype)
        out[name] = cast[key]
    return out


def _fix_config_dtype(directory: Path, dtype: torch.dtype) -> None:
    """config.json names the dtype the weights were saved in (save_pretrained records the training dtype)."""
    path = directory / "config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).split(".")[-1]
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = name
    write_json(path, config)


def _epoch_losses(log_history: list[dict], steps_per_epoch: int, epochs: int) -> list[float]:
    sums, counts = [0.0] * epochs, [0] * epochs
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            e = min((entry["step"] - 1) // steps_per_epoch, epochs - 1)
            sums[e] += entry["loss"]
            counts[e] += 1
    return [s / c if c else float("nan") for s, c in zip(sums, counts)]


def merge_adapter(base_model: str, adapter_dir: Path, output_dir: Path, save_dtype: torch.dtype) -> None:
    """Base (fp32) + adapter -> one full checkpoint in save_dtype. Runs on one process, on CPU."""
    model, tokenizer = load_model(base_model, "fp32", "cpu")
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.to(save_dtype)
    merged.save_pretrained(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
    _fix_config_dtype(output_dir, save_dtype)


def _base_model_path(name: str) -> str:
    """Local directories as absolute paths, so an adapter's base stays findable from anywhere."""
    path = Path(name)
    return str(path.resolve()) if path.is_dir() else name


def broadcasts_weights(config: FinetuneArgs, processes: int, cuda: bool) -> bool:
    """Whether only rank 0 reads the checkpoint: full fine-tuning under FSDP on GPUs (accelerate runs FSDP on
    accelerators only; LoRA adapters are created per rank, so a LoRA run loads the base model on every rank)."""
    return config.fsdp and processes > 1 and cuda and not config.lora


def trainer_fsdp_arguments(config: FinetuneArgs, layer_classes: list[str], broadcast_weights: bool) -> dict:
    """TrainingArguments' FSDP settings: FSDP2, full shard, one unit per decoder layer, weights broadcast from
    rank 0 (cpu_ram_efficient_loading), FSDP's own activation checkpointing when asked for."""
    if not config.fsdp:
        return {"activation_checkpointing": config.gradient_checkpointing}
    return {"fsdp": True,
            "fsdp_config": {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "transformer_layer_cls_to_wrap": layer_classes,
                            "cpu_ram_efficient_loading": broadcast_weights, "state_dict_type": "FULL_STATE_DICT",
                            "activation_checkpointing": config.gradient_checkpointing}}


def _empty_model(base_name: str, dtype: str):
    """The model's structure with its parameters on the meta device (buffers such as RoPE's are real)."""
    config = AutoConfig.from_pretrained(base_name)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])


FLAG_DEFAULTS = {f.name: f.default for f in fields(FinetuneArgs) if f.default is not MISSING}


def recorded_flags(config: FinetuneArgs) -> dict:
    """The flags finetune_meta.json records: every field, --field_map only when one was given (as the feature
    stages' meta.json)."""
    flags = {k: v for k, v in asdict(config).items() if k not in NOT_RECORDED}
    if flags["field_map"] is None:
        del flags["field_map"]
    return flags


def requested_settings(config: FinetuneArgs, data_sha256: str, base_model: str) -> dict:
    """What determines a fine-tune: its flags, the subset's content and the base model's identity."""
    flags = {k: v for k, v in recorded_flags(config).items() if k not in NOT_SETTINGS}
    return {"flags": flags, "data_sha256": data_sha256, "base_model": base_model}


def _settings_value(key: str, value):
    """A setting as compared: the base model by its content (store.model_key), not the path it was read from."""
    return model_key(value) if key == "base_model" else value


def settings_differences(recorded_meta: dict, requested: dict) -> list[str]:
    """'name: recorded X, requested Y' for every setting a finished run was made with differently."""
    recorded = recorded_meta.get("settings") or {
        "flags": {k: v for k, v in (recorded_meta.get("flags") or {}).items() if k not in NOT_SETTINGS},
        "data_sha256": recorded_meta.get("data_sha256"), "base_model": recorded_meta.get("base_model")}
    differences = []
    for key in sorted((set(recorded["flags"]) | set(requested["flags"])) - set(NOT_SETTINGS)):
        # a flag added after the run was made counts as its default
        old, new = recorded["flags"].get(key, FLAG_DEFAULTS.get(key)), requested["flags"].get(key)
        if old != new:
            differences.append(f"{key}: recorded {old!r}, requested {new!r}")
    for key, what in (("data_sha256", "subset content (sha256)"), ("base_model", "base model")):
        if _settings_value(key, recorded.get(key)) != _settings_value(key, requested[key]):
            differences.append(f"{what}: recorded {recorded.get(key)}, requested {requested[key]}")
    return differences


# ----------------------------------------------------------------------------- the stage


def finetune(config: FinetuneArgs) -> dict:
    """Fine-tune, save the checkpoint and finetune_meta.json; returns the meta (on every process)."""

    out = Path(config.output_dir)
    interactive = sys.stderr.isatty()
    if not interactive:  # a batch job's log: no progress-bar redraws from loading and saving either
        hf_logging.disable_progress_bar()
    if config.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if config.merge_lora and not config.lora:
        raise UserError("--merge_lora needs --lora")
    base_name = _base_model_path(config.model_name)
    requested = requested_settings(config, D.file_sha256(config.data_path), model_identity(base_name))
    if (out / META_NAME).exists():
        recorded = read_json(out / META_NAME)
        differences = settings_differences(recorded, requested)
        if config.reuse_if_same and not differences:
            log.info("%s: already fine-tuned with these settings (%s); keeping it", out, META_NAME)
            return recorded
        if not config.overwrite:
            if differences:
                raise UserError(f"{out}: holds a fine-tune made with other settings ({'; '.join(differences)}); "
                                "use another --output_dir (SAVE_NAME in the SLURM job) or --overwrite")
            raise UserError(f"{out}: already holds a finished fine-tune ({META_NAME}) with these settings; use "
                            "--reuse_if_same to keep it, another --output_dir, or --overwrite")
        if int(os.environ.get("RANK", "0")) == 0:  # no stale "complete" marker while the new run is under way
            log.warning("%s: replacing the finished fine-tune there (--overwrite)", out)
            (out / META_NAME).unlink(missing_ok=True)
            (out / ADAPTER_DIR / META_NAME).unlink(missing_ok=True)
    processes = launched_world_size()
    per_device, accumulation = plan_batches(config.batch_size, config.per_device_batch_size, processes)
    cuda = torch.cuda.is_available()
    load_dtype, bf16_autocast = resolve_precision(config.precision, cuda)
    save_dtype = resolve_save_dtype(config.save_dtype, config.precision, cuda)
    if config.fsdp and not cuda and processes > 1:
        log.warning("--fsdp without CUDA: accelerate applies FSDP on accelerators only; these CPU processes run DDP")
    if config.fsdp and processes == 1:
        log.warning("--fsdp with one process shards nothing; launch with torchrun --nproc_per_node N")

    tokenizer = load_tokenizer(base_name)
    template = choose_template(base_name, config.template, tokenizer)
    examples, skipped = D.load_examples(config.data_path, need_response=True, skip_bad=config.skip_bad,
                                        field_map=D.field_map_of(config.field_map))
    encoded, excluded = encoding = D.encode_examples(examples, tokenizer, template, config.max_length)  # logs the cut
    if not encoded:
        raise UserError(f"{config.data_path}: no example has a supervised token (check --max_length)")
    if len(encoded) < config.batch_size:
        log.warning("%s: %d example(s) for an effective batch of %d: each epoch is a single optimizer step on "
                    "all of them (lower --batch_size for more steps)", config.data_path, len(encoded),
                    config.batch_size)
    data_sha = requested["data_sha256"]

    # Weights read once under FSDP: rank 0 loads them, the others start on the meta device and get their shards
    # from rank 0 when the Trainer wraps the model (accelerate's cpu_ram_efficient_loading).
    broadcast_weights = broadcasts_weights(config, processes, cuda)
    rank = int(os.environ.get("RANK", "0"))
    if broadcast_weights and rank != 0:
        model = _empty_model(base_name, load_dtype)
        log.info("rank %d: model built on the meta device; FSDP fills in its shard from rank 0's weights", rank)
    else:
        model, _ = load_model(base_name, load_dtype, "cpu")
    model.config.use_cache = False
    if config.lora:
        lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
        torch.manual_seed(config.seed)  # LoRA's A matrices are random: the seed decides them
        try:
            model = get_peft_model(model, lora_config)
        except ValueError as err:
            raise UserError(f"--lora_target_modules {','.join(config.lora_target_modules)}: {err}") from None

    resume_from = checkpoint_to_resume(out, requested)
    resumed_loss_sum = read_json(resume_from / LOSS_SUM_FILE)["loss_sum"] if resume_from else 0.0
    if config.checkpoint_minutes > 0 and rank == 0:
        write_json(out / RESUME_FILE, requested)   # before the first checkpoint: what its settings are

    fsdp_kwargs = trainer_fsdp_arguments(config, decoder_layer_classes(model) if config.fsdp else [], broadcast_weights)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        warmup_steps=0,
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        bf16=bf16_autocast,
        logging_strategy="steps",
        logging_steps=1,
        # A batch job's log gets one line per step (the Trainer's own log printer), not progress-bar redraws.
        disable_tqdm=not interactive,
        eval_strategy="no",
        save_strategy="no",         # checkpoints by time instead (TimedCheckpoints), the latest one kept
        save_total_limit=1,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=cuda,
        # Without CUDA the Trainer only runs torchrun processes as DDP when told it is on CPU (gloo).
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and processes > 1 else None,
        **fsdp_kwargs,
    )
    Trainer, TimedCheckpoints = _make_trainer_class()
    callbacks = [TimedCheckpoints(60 * config.checkpoint_minutes)] if config.checkpoint_minutes > 0 else []
    trainer = Trainer(model=model, args=args, train_dataset=SubsetDataset(encoded),
                      data_collator=Collator(D.pad_token_id(tokenizer)), processing_class=tokenizer,
                      lr_decay=config.lr_decay, num_epochs=config.epochs,
                      save_dtype=None if config.lora else save_dtype, resumed_loss_sum=resumed_loss_sum,
                      callbacks=callbacks)
    log.info("fine-tuning %s on %d example(s) of %s: %d process(es) x %d per device x %d accumulation = %d per step",
             config.model_name, len(encoded), config.data_path, processes, per_device, accumulation,
             processes * per_device * accumulation)
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_loss = result.training_loss
    if resume_from is not None:   # the Trainer's own mean covers the steps this process ran
        steps_run = trainer.state.global_step - _checkpoint_step(resume_from)
        train_loss = (resumed_loss_sum + result.training_loss * steps_run) / max(trainer.state.global_step, 1)

    save_to = out / ADAPTER_DIR if config.merge_lora else out
    trainer.save_model(str(save_to))
    history = [dict(e) for e in trainer.state.log_history]
    steps_per_epoch = trainer.steps_per_epoch or 1
    step_losses = [e["loss"] for e in history if "loss" in e]
    meta = {
        "stage": "finetune",
        "base_model": requested["base_model"],
        "base_model_name": config.model_name,
        "template": template,
        "data_file": str(Path(config.data_path).resolve()),
        "data_sha256": data_sha,
        "n": len(encoded),
        "indices": [e.index for e in encoded],
        "ids": [e.id for e in encoded],
        "excluded": [vars(e) for e in excluded],
        "n_cut": encoding.n_cut,                 # examples --max_length cut
        "skipped": skipped,
        "flags": recorded_flags(config),
        "settings": requested,
        "world_size": processes,
        "per_device_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": per_device * accumulation * processes,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": trainer.state.global_step,
        "compute": {"load_dtype": load_dtype, "bf16_autocast": bf16_autocast, "device": str(args.device),
                    "fsdp": config.fsdp, "fsdp_applied": bool(trainer.is_fsdp_enabled),
                    "weights_broadcast_from_rank0": broadcast_weights},
        "save_dtype": "fp32 (adapter)" if config.lora and not config.merge_lora else str(save_dtype).split(".")[-1],
        "kind": "lora_merged" if config.merge_lora else ("lora_adapter" if config.lora else "full"),
        "train_loss": train_loss,
        "final_step_loss": step_losses[-1] if step_losses else None,
        "epoch_losses": _epoch_losses(history, steps_per_epoch, config.epochs),
        "log_history": history,
        "train_runtime_s": result.metrics.get("train_runtime"),
        **({"resumed_from_step": _checkpoint_step(resume_from)} if resume_from is not None else {}),
    }
    if trainer.args.should_save:
        if not config.lora:
            _fix_config_dtype(out, save_dtype)
        if config.merge_lora:
            write_json(save_to / META_NAME, dict(meta, kind="lora_adapter", save_dtype="fp32 (adapter)"))
            merge_adapter(base_name, save_to, out, save_dtype)
        meta.update(created=now(), environment=environment())
        # save_pretrained writes safetensors files owner-only (temporary-file modes): give them the user's umask
        for directory in (out, out / ADAPTER_DIR):
            if directory.is_dir():
                apply_umask(directory)
        remove_checkpoints(out)            # the run is complete: nothing left to resume
        write_json(out / META_NAME, meta)  # last: its presence marks a complete checkpoint
        log.info("wrote %s (train loss %.4f; per epoch %s)", out, train_loss,
                 ", ".join(f"{x:.4f}" for x in meta["epoch_losses"]))
    if processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return meta


__all__ = ["FinetuneArgs", "finetune", "read_finetune_meta", "plan_batches", "epoch_decay", "decoder_layer_classes",
           "requested_settings", "settings_differences", "broadcasts_weights", "trainer_fsdp_arguments",
           "META_NAME", "ADAPTER_DIR", "PRECISIONS", "SAVE_DTYPES"]
