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

The Trainer is used through its public hooks only: `EpochDecayTrainer.create_scheduler` (the per-epoch decay),
callbacks (`TimedCheckpoints`, `CheckpointLossSum`) and `save_model`; `FinetuneArgs.training_arguments` is the one
place the settings become TrainingArguments. `finetune` is a sequence of steps, one function each.

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
from transformers.trainer_utils import TrainOutput
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
# The Trainer's arguments every run shares, whatever its flags. Each is pinned even where it is transformers'
# default today, so that a default changed by an upgrade cannot change the recipe or the outputs.
FIXED_TRAINING_ARGUMENTS = {
    "optim": "adamw_torch",             # the runs' AdamW (transformers 5 defaults to the fused kernel)
    "warmup_steps": 0,
    "logging_strategy": "steps",
    "logging_steps": 1,                 # every step's loss: epoch_losses, and the loss sum a checkpoint carries
    "eval_strategy": "no",
    "save_strategy": "no",              # checkpoints by time instead (TimedCheckpoints)
    "save_total_limit": 1,              # the latest checkpoint kept
    "report_to": "none",
    "remove_unused_columns": False,     # the collator reads the dataset's own fields
    "dataloader_num_workers": 0,
    "ddp_find_unused_parameters": False,
}


OPTIMISATION = "optimisation (defaults: the paper)"
LORA = "LoRA"


@dataclass(kw_only=True)
class FinetuneArgs:
    """Everything that determines a fine-tuned checkpoint (recorded verbatim in finetune_meta.json); finetune.py's
    flags are generated from these fields, and `training_arguments` is the one place they are mapped onto
    transformers' TrainingArguments.

    Not a TrainingArguments subclass, as TRL's SFTConfig is: a dataclass keeps an inherited field at the base
    class's place, so output_dir, learning_rate, seed, ... would move in --help and in the recorded flags;
    TrainingArguments' `gradient_checkpointing` (a deprecated alias) and `fsdp` mean other things than these
    flags; the per-device batch and accumulation depend on the processes launched, and the FSDP layer classes on
    the model loaded; and TrainingArguments with FSDP set environment variables when they are made."""

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

    def training_arguments(self, launch: Launch, layer_classes: list[str]) -> TrainingArguments:
        """The Trainer's arguments for this run: these settings, the launch's batch plan and precision, the
        recipe's fixed choices (FIXED_TRAINING_ARGUMENTS) and the FSDP settings (layer_classes: the units FSDP
        wraps, when --fsdp)."""
        return TrainingArguments(
            output_dir=str(Path(self.output_dir)),
            per_device_train_batch_size=launch.per_device,
            gradient_accumulation_steps=launch.accumulation,
            num_train_epochs=self.epochs,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2, adam_epsilon=self.adam_epsilon,
            max_grad_norm=self.max_grad_norm,
            seed=self.seed,
            data_seed=self.seed,
            train_sampling_strategy="group_by_length" if self.group_by_length else "random",
            bf16=launch.bf16_autocast,
            # A batch job's log gets one line per step (the Trainer's own log printer), not progress-bar redraws.
            disable_tqdm=not launch.interactive,
            dataloader_pin_memory=launch.cuda,
            # Without CUDA the Trainer only runs torchrun processes as DDP when told it is on CPU (gloo).
            use_cpu=not launch.cuda,
            ddp_backend="gloo" if not launch.cuda and launch.processes > 1 else None,
            **FIXED_TRAINING_ARGUMENTS,
            **trainer_fsdp_arguments(self, layer_classes, launch.broadcast_weights),
        )


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


# ----------------------------------------------------------------------------- the Trainer, through its public hooks
#
# Everything below uses what transformers documents for subclasses and callbacks: `create_scheduler` (the lr
# schedule), `TrainerCallback` (timed checkpoints; the loss sum each checkpoint carries, from the logged losses)
# and `save_model` (the final weights, cast to the save dtype on the model first). Nothing overrides a private
# method or reads a private attribute of the Trainer.


class EpochDecayTrainer(Trainer):
    """The Trainer with the paper's schedule: lr multiplied by `lr_decay` after every epoch (StepLR by epoch)."""

    def __init__(self, *args, lr_decay: float, num_epochs: int, **kwargs):
        self.lr_decay = lr_decay
        self.num_epochs = num_epochs
        self.steps_per_epoch: int | None = None   # known once the Trainer asks for the schedule
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # The public hook transformers documents for another schedule. (The base method also sets a private flag
        # that makes a second train() call build a new schedule; an EpochDecayTrainer is trained once.)
        if self.lr_scheduler is None:
            # The Trainer runs ceil(epochs x update steps per epoch) steps; epochs are whole numbers here.
            self.steps_per_epoch = max(1, num_training_steps // self.num_epochs)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer if optimizer is not None else self.optimizer,
                functools.partial(epoch_decay, steps_per_epoch=self.steps_per_epoch, decay=self.lr_decay))
        return self.lr_scheduler


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


class CheckpointLossSum(TrainerCallback):
    """Writes LOSS_SUM_FILE into each checkpoint once the Trainer has saved it (on_save): the sum of the step losses
    up to it (the Trainer's own train loss counts only the steps one train() call ran, so a resumed run adds this),
    and, being written last, the mark that the checkpoint is complete.

    The losses are the logged ones (logging every step): each is the step's loss averaged over the processes, the
    same numbers, added in the same order, as the Trainer's own running total."""

    def __init__(self, resumed_loss_sum: float):
        self.resumed_loss_sum = resumed_loss_sum   # the step losses before the checkpoint this run resumed from
        self.loss_sum = 0.0                        # those of this run's steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss_sum += logs["loss"]

    def on_save(self, args, state, control, **kwargs):   # TrainerCallback's public hook, not Trainer._save
        if args.should_save:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json(directory / LOSS_SUM_FILE, {"step": state.global_step,
                                                   "loss_sum": self.resumed_loss_sum + self.loss_sum})
            log.info("checkpoint %s (resumable: rerun the same command)", directory)


def save_trained_model(trainer: Trainer, directory: Path, save_dtype: torch.dtype | None) -> None:
    """The trained model through the Trainer's save_model, in `save_dtype` (None: as trained, e.g. a LoRA adapter),
    with the KV cache switched back on (off for training only; generation wants it). The model is cast in place:
    training is over, and a cast module keeps its tied weights one tensor, so save_pretrained writes them once.
    Checkpoints never come here: they keep the training weights as they are, to resume from them exactly."""
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = True
    if save_dtype is not None:
        model.to(save_dtype)   # under FSDP2 too: a sharded module re-registers its shards after a cast
    trainer.save_model(str(directory))


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


@dataclass(frozen=True)
class Launch:
    """What one run resolves from its settings and the processes it was launched with."""

    processes: int
    rank: int
    cuda: bool
    interactive: bool             # stderr is a terminal: progress bars, else one log line per step
    per_device: int
    accumulation: int
    load_dtype: str
    bf16_autocast: bool
    save_dtype: torch.dtype
    broadcast_weights: bool       # rank 0 reads the weights, the other ranks get their shards from it


def _rank() -> int:
    """This process's rank under torchrun (0 outside it), known before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def check_settings(config: FinetuneArgs) -> None:
    """Refuse settings that contradict each other, before any work."""
    if config.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if config.merge_lora and not config.lora:
        raise UserError("--merge_lora needs --lora")


def finished_run_to_keep(config: FinetuneArgs, requested: dict) -> dict | None:
    """The rerun policy for an --output_dir that holds a finished fine-tune: its meta when --reuse_if_same and its
    settings are these; a refusal naming the differences without --overwrite; else None (with --overwrite, its
    finished marker is removed first, so that no stale 'complete' marker stands while the new run is under way)."""
    out = Path(config.output_dir)
    if not (out / META_NAME).exists():
        return None
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
    if _rank() == 0:
        log.warning("%s: replacing the finished fine-tune there (--overwrite)", out)
        (out / META_NAME).unlink(missing_ok=True)
        (out / ADAPTER_DIR / META_NAME).unlink(missing_ok=True)
    return None


def plan_launch(config: FinetuneArgs) -> Launch:
    """Processes, batch plan, precision and where the weights are read, for this launch."""
    processes = launched_world_size()
    per_device, accumulation = plan_batches(config.batch_size, config.per_device_batch_size, processes)
    cuda = torch.cuda.is_available()
    load_dtype, bf16_autocast = resolve_precision(config.precision, cuda)
    save_dtype = resolve_save_dtype(config.save_dtype, config.precision, cuda)
    if config.fsdp and not cuda and processes > 1:
        log.warning("--fsdp without CUDA: accelerate applies FSDP on accelerators only; these CPU processes run DDP")
    if config.fsdp and processes == 1:
        log.warning("--fsdp with one process shards nothing; launch with torchrun --nproc_per_node N")
    return Launch(processes=processes, rank=_rank(), cuda=cuda, interactive=sys.stderr.isatty(),
                  per_device=per_device, accumulation=accumulation, load_dtype=load_dtype,
                  bf16_autocast=bf16_autocast, save_dtype=save_dtype,
                  broadcast_weights=broadcasts_weights(config, processes, cuda))


@dataclass
class Subset:
    """The subset as trained on: its template, encoded examples, and what was left out."""

    template: str
    encoded: list[D.Encoded]
    excluded: list                # records left out (nothing supervised after the cut)
    n_cut: int                    # examples --max_length cut
    skipped: list                 # bad records skipped (--skip_bad)


def load_subset(config: FinetuneArgs, base_name: str, tokenizer) -> Subset:
    """The subset's records encoded with the run's template (--max_length cuts logged), refused when nothing in it
    is supervised."""
    template = choose_template(base_name, config.template, tokenizer)
    examples, skipped = D.load_examples(config.data_path, need_response=True, skip_bad=config.skip_bad,
                                        field_map=D.field_map_of(config.field_map))
    encoding = D.encode_examples(examples, tokenizer, template, config.max_length)   # logs the cut
    if not encoding.encoded:
        raise UserError(f"{config.data_path}: no example has a supervised token (check --max_length)")
    if len(encoding.encoded) < config.batch_size:
        log.warning("%s: %d example(s) for an effective batch of %d: each epoch is a single optimizer step on "
                    "all of them (lower --batch_size for more steps)", config.data_path, len(encoding.encoded),
                    config.batch_size)
    return Subset(template, encoding.encoded, encoding.excluded, encoding.n_cut, skipped)


def load_training_model(config: FinetuneArgs, base_name: str, launch: Launch) -> torch.nn.Module:
    """The model to train: the base model (under FSDP's broadcast, only rank 0 reads its weights; the others build
    it on the meta device and get their shards from rank 0 when the Trainer wraps it), with a LoRA adapter when
    asked for."""
    if launch.broadcast_weights and launch.rank != 0:
        model = _empty_model(base_name, launch.load_dtype)
        log.info("rank %d: model built on the meta device; FSDP fills in its shard from rank 0's weights", launch.rank)
    else:
        model, _ = load_model(base_name, launch.load_dtype, "cpu")
    model.config.use_cache = False
    if not config.lora:
        return model
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # LoRA's A matrices are random: the seed decides them
    try:
        return get_peft_model(model, lora_config)
    except ValueError as err:
        raise UserError(f"--lora_target_modules {','.join(config.lora_target_modules)}: {err}") from None


def make_trainer(config: FinetuneArgs, launch: Launch, model, tokenizer, subset: Subset,
                 resumed_loss_sum: float) -> EpochDecayTrainer:
    """The Trainer for this run, with its timed checkpoints (and their loss sums) when checkpoints are on."""
    layer_classes = decoder_layer_classes(model) if config.fsdp else []
    callbacks = ([TimedCheckpoints(60 * config.checkpoint_minutes), CheckpointLossSum(resumed_loss_sum)]
                 if config.checkpoint_minutes > 0 else [])
    return EpochDecayTrainer(model=model, args=config.training_arguments(launch, layer_classes),
                             train_dataset=SubsetDataset(subset.encoded),
                             data_collator=Collator(D.pad_token_id(tokenizer)), processing_class=tokenizer,
                             lr_decay=config.lr_decay, num_epochs=config.epochs, callbacks=callbacks)


def train(trainer: EpochDecayTrainer, resume_from: Path | None,
          resumed_loss_sum: float) -> tuple[TrainOutput, float]:
    """Train (from the checkpoint when there is one); (the Trainer's result, the mean step loss of the whole run)."""
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_loss = result.training_loss
    if resume_from is not None:   # the Trainer's own mean covers the steps this process ran
        steps_run = trainer.state.global_step - _checkpoint_step(resume_from)
        train_loss = (resumed_loss_sum + result.training_loss * steps_run) / max(trainer.state.global_step, 1)
    return result, train_loss


def finetune_meta(config: FinetuneArgs, launch: Launch, requested: dict, subset: Subset, trainer: EpochDecayTrainer,
                  result: TrainOutput, train_loss: float, resume_from: Path | None) -> dict:
    """finetune_meta.json's content (without the time it was written and the environment)."""
    history = [dict(e) for e in trainer.state.log_history]
    steps_per_epoch = trainer.steps_per_epoch or 1
    step_losses = [e["loss"] for e in history if "loss" in e]
    per_device, accumulation = launch.per_device, launch.accumulation
    return {
        "stage": "finetune",
        "base_model": requested["base_model"],
        "base_model_name": config.model_name,
        "template": subset.template,
        "data_file": str(Path(config.data_path).resolve()),
        "data_sha256": requested["data_sha256"],
        "n": len(subset.encoded),
        "indices": [e.index for e in subset.encoded],
        "ids": [e.id for e in subset.encoded],
        "excluded": [vars(e) for e in subset.excluded],
        "n_cut": subset.n_cut,
        "skipped": subset.skipped,
        "flags": recorded_flags(config),
        "settings": requested,
        "world_size": launch.processes,
        "per_device_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": per_device * accumulation * launch.processes,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": trainer.state.global_step,
        "compute": {"load_dtype": launch.load_dtype, "bf16_autocast": launch.bf16_autocast,
                    "device": str(trainer.args.device), "fsdp": config.fsdp,
                    "fsdp_applied": bool(trainer.is_fsdp_enabled),
                    "weights_broadcast_from_rank0": launch.broadcast_weights},
        "save_dtype": ("fp32 (adapter)" if config.lora and not config.merge_lora else
                       str(launch.save_dtype).split(".")[-1]),
        "kind": "lora_merged" if config.merge_lora else ("lora_adapter" if config.lora else "full"),
        "train_loss": train_loss,
        "final_step_loss": step_losses[-1] if step_losses else None,
        "epoch_losses": _epoch_losses(history, steps_per_epoch, config.epochs),
        "log_history": history,
        "train_runtime_s": result.metrics.get("train_runtime"),
        **({"resumed_from_step": _checkpoint_step(resume_from)} if resume_from is not None else {}),
    }


def write_outputs(config: FinetuneArgs, launch: Launch, trainer: EpochDecayTrainer, base_name: str,
                  meta: dict) -> None:
    """The checkpoint (or adapter; with --merge_lora also the merged model) and, last, finetune_meta.json, whose
    presence marks the checkpoint complete. Every process takes part in the save (collective under FSDP); rank 0
    writes."""
    out = Path(config.output_dir)
    save_to = out / ADAPTER_DIR if config.merge_lora else out
    save_trained_model(trainer, save_to, None if config.lora else launch.save_dtype)
    if not trainer.args.should_save:
        return
    if not config.lora:
        _fix_config_dtype(out, launch.save_dtype)
    if config.merge_lora:
        write_json(save_to / META_NAME, dict(meta, kind="lora_adapter", save_dtype="fp32 (adapter)"))
        merge_adapter(base_name, save_to, out, launch.save_dtype)
    meta.update(created=now(), environment=environment())
    # save_pretrained writes safetensors files owner-only (temporary-file modes): give them the user's umask
    for directory in (out, out / ADAPTER_DIR):
        if directory.is_dir():
            apply_umask(directory)
    remove_checkpoints(out)            # the run is complete: nothing left to resume
    write_json(out / META_NAME, meta)  # last: its presence marks a complete checkpoint
    log.info("wrote %s (train loss %.4f; per epoch %s)", out, meta["train_loss"],
             ", ".join(f"{x:.4f}" for x in meta["epoch_losses"]))


def finetune(config: FinetuneArgs) -> dict:
    """Fine-tune, save the checkpoint and finetune_meta.json; returns the meta (on every process)."""
    if not sys.stderr.isatty():  # a batch job's log: no progress-bar redraws from loading and saving either
        hf_logging.disable_progress_bar()
    check_settings(config)
    base_name = _base_model_path(config.model_name)
    requested = requested_settings(config, D.file_sha256(config.data_path), model_identity(base_name))
    kept = finished_run_to_keep(config, requested)
    if kept is not None:
        return kept
    launch = plan_launch(config)
    tokenizer = load_tokenizer(base_name)
    subset = load_subset(config, base_name, tokenizer)
    model = load_training_model(config, base_name, launch)

    out = Path(config.output_dir)
    resume_from = checkpoint_to_resume(out, requested)
    resumed_loss_sum = read_json(resume_from / LOSS_SUM_FILE)["loss_sum"] if resume_from else 0.0
    if config.checkpoint_minutes > 0 and launch.rank == 0:
        write_json(out / RESUME_FILE, requested)   # before the first checkpoint: what its settings are
    trainer = make_trainer(config, launch, model, tokenizer, subset, resumed_loss_sum)
    log.info("fine-tuning %s on %d example(s) of %s: %d process(es) x %d per device x %d accumulation = %d per step",
             config.model_name, len(subset.encoded), config.data_path, launch.processes, launch.per_device,
             launch.accumulation, launch.processes * launch.per_device * launch.accumulation)
    result, train_loss = train(trainer, resume_from, resumed_loss_sum)

    meta = finetune_meta(config, launch, requested, subset, trainer, result, train_loss, resume_from)
    write_outputs(config, launch, trainer, base_name, meta)
    if launch.processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return meta


__all__ = ["FinetuneArgs", "finetune", "read_finetune_meta", "plan_batches", "epoch_decay", "decoder_layer_classes",
           "requested_settings", "settings_differences", "broadcasts_weights", "trainer_fsdp_arguments",
           "META_NAME", "ADAPTER_DIR", "PRECISIONS", "SAVE_DTYPES"]
