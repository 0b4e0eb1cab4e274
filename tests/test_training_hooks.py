"""How fine-tuning uses transformers: the settings mapped onto TrainingArguments in one place, and the Trainer
through its public hooks only (no private method overridden, no private attribute read)."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from safedata import training
from safedata.config import option_fields
from safedata.training import FIXED_TRAINING_ARGUMENTS, EpochDecayTrainer, FinetuneArgs, Launch


def launch(**changes):
    base = dict(processes=1, rank=0, cuda=False, interactive=False, per_device=2, accumulation=3, load_dtype="fp32",
                bf16_autocast=False, save_dtype=torch.float32, broadcast_weights=False)
    base.update(changes)
    return Launch(**base)


def settings(**changes):
    return FinetuneArgs(**{"model_name": "m", "data_path": "d.json", "output_dir": "runs/ft/x/", **changes})


def test_training_arguments_carry_the_settings_the_launch_and_the_fixed_recipe():
    args = settings(learning_rate=2e-4, epochs=4, seed=7, weight_decay=0.01, max_grad_norm=1.5,
                    group_by_length=True).training_arguments(launch(), [])
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (2, 3, 4)
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm) == (2e-4, 0.01, 1.5)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert args.seed == args.data_seed == 7 and args.train_sampling_strategy == "group_by_length"
    assert args.output_dir == "runs/ft/x" and args.use_cpu and not args.bf16 and args.disable_tqdm
    assert args.ddp_backend is None and not args.dataloader_pin_memory and not args.activation_checkpointing
    for name, value in FIXED_TRAINING_ARGUMENTS.items():
        assert getattr(args, name) == (value if name != "report_to" else []), name   # TrainingArguments: [] = none
    # (two CPU processes get ddp_backend gloo: tests/test_training.py's torchrun runs)
    other = settings(gradient_checkpointing=True).training_arguments(launch(interactive=True), [])
    assert other.activation_checkpointing and not other.disable_tqdm and other.train_sampling_strategy == "random"


def test_settings_are_not_training_arguments_so_flags_keep_their_order():
    """A dataclass keeps an inherited field at its base class's place: as a TrainingArguments subclass, output_dir,
    learning_rate and seed would move in --help and in finetune_meta.json's flags (the reason FinetuneArgs maps
    its fields in training_arguments instead)."""
    names = [f.name for f, _ in option_fields(FinetuneArgs)]
    assert names[:3] == ["model_name", "data_path", "output_dir"] and names.index("learning_rate") == 5
    assert not any(f.name == "per_device_train_batch_size" for f in dataclasses.fields(FinetuneArgs))


def test_the_trainer_is_used_through_public_hooks_only():
    own = [name for name in vars(EpochDecayTrainer) if callable(getattr(EpochDecayTrainer, name))]
    assert sorted(own) == ["__init__", "create_scheduler"]
    source = Path(training.__file__).read_text()
    for private in ("_save_checkpoint", "_total_loss_scalar", "_created_lr_scheduler", "._save("):
        assert private not in source, private
    # no private attribute of a Trainer (or its state and arguments) read or set
    assert not re.findall(r"\b(?:self|trainer)\._\w+", source)


def test_the_schedule_decays_once_an_epoch(tmp_path):
    model = torch.nn.Linear(2, 1)
    trainer = EpochDecayTrainer(model=model, args=settings(output_dir=str(tmp_path), learning_rate=1.0)
                                .training_arguments(launch(), []), lr_decay=0.5, num_epochs=3)
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=6)
    assert trainer.steps_per_epoch == 2 and trainer.create_scheduler(6) is scheduler
    lrs = []
    for _ in range(6):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])

