"""LoRA mode (LESS-style): the peft adapter, and a Trainer's Adam state as a per-example preconditioner."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ...data import file_sha256
from ...errors import UserError
from ...models import load_model


@dataclass
class AdamState:
    """exp_avg / exp_avg_sq per LoRA parameter, and the optimizer's betas and eps."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    source: str = ""

    def to(self, device, dtype) -> "AdamState":
        move = lambda d: {k: v.to(device=device, dtype=dtype) for k, v in d.items()}  # noqa: E731
        return AdamState(move(self.exp_avg), move(self.exp_avg_sq), self.beta1, self.beta2, self.eps, self.source)

    def apply(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """Per-example Adam update direction for grads [B, *shape] of parameter `name`."""
        m, v = self.exp_avg[name], self.exp_avg_sq[name]
        b1, b2 = self.beta1, self.beta2
        return (b1 * m + (1 - b1) * grads) / (torch.sqrt(b2 * v + (1 - b2) * grads * grads) + self.eps)


def load_adam_state(path, model) -> AdamState:
    """A Trainer's optimizer.pt: state index n belongs to the n-th trainable (LoRA) parameter (LESS's reading)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--optimizer_state {path}: missing") from None
    except Exception as err:  # noqa: BLE001
        raise UserError(f"--optimizer_state {path}: cannot read a torch-saved optimizer state ({err})") from None
    if not isinstance(saved, dict) or "state" not in saved:
        raise UserError(f"--optimizer_state {path}: expected an optimizer state_dict with a 'state' entry")
    params = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    state = saved["state"]
    groups = saved.get("param_groups") or [{}]
    betas = groups[0].get("betas", (0.9, 0.999))
    eps = groups[0].get("eps", 1e-8)
    exp_avg, exp_avg_sq = {}, {}
    for index, (name, p) in enumerate(params):
        entry = state.get(index, state.get(name))
        if entry is None or "exp_avg" not in entry or "exp_avg_sq" not in entry:
            raise UserError(f"--optimizer_state {path}: no Adam state for parameter {index} ({name}); it holds "
                            f"{len(state)} entries for {len(params)} LoRA parameters")
        for key, store in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if tuple(entry[key].shape) != tuple(p.shape):
                raise UserError(f"--optimizer_state {path}: state {index} {key} has shape {tuple(entry[key].shape)}, "
                                f"parameter {name} has {tuple(p.shape)} (another adapter?)")
            store[name] = entry[key]
    if len(state) != len(params):
        raise UserError(f"--optimizer_state {path}: {len(state)} state entries for {len(params)} LoRA parameters")
    return AdamState(exp_avg, exp_avg_sq, float(betas[0]), float(betas[1]), float(eps), str(path))


def lora_settings(mode, lora_r=8, lora_alpha=32, lora_target_modules=("q_proj", "v_proj"), lora_path=None,
                  seed=0) -> dict | None:
    if mode != "lora":
        return None
    if lora_path:
        return {"path": str(Path(lora_path).resolve()), "files": _dir_digest(lora_path)}
    modules = sorted(m for spec in lora_target_modules for m in str(spec).split(",") if m)
    return {"r": int(lora_r), "alpha": float(lora_alpha), "target_modules": modules, "seed": int(seed)}


def _dir_digest(path) -> str:
    path = Path(path)
    digest = hashlib.sha256()
    for f in sorted(path.glob("*")) if path.is_dir() else []:
        if f.is_file():
            digest.update(f.name.encode())
            digest.update(bytes.fromhex(file_sha256(f)))
    return digest.hexdigest()[:16]


def apply_lora(model, settings: dict, lora_path=None):
    """Wrap with peft: the adapter from lora_path, or a fresh one (seeded; random A, zero B)."""
    dtype = next(model.parameters()).dtype
    if lora_path:
        try:
            model = PeftModel.from_pretrained(model, str(lora_path), is_trainable=False)
        except (OSError, ValueError) as err:
            raise UserError(f"--lora_path {lora_path}: cannot load a peft adapter ({str(err).splitlines()[0]})") from None
    else:
        torch.manual_seed(settings["seed"])
        config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], target_modules=settings["target_modules"],
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, config)
        except ValueError as err:
            raise UserError(f"--lora_target_modules: {str(err).splitlines()[0]}") from None
    if dtype == torch.float64:
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(dtype)
    model.eval()
    return model


def setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state, model=None, tokenizer=None):
    if model is None:
        model, tokenizer = load_model(model_name, dtype, device)
    if mode == "lora":
        model = apply_lora(model, lora, lora_path)
    elif lora_path or optimizer_state:
        raise UserError("--lora_path / --optimizer_state need --mode lora")
    adam = load_adam_state(optimizer_state, model) if optimizer_state else None
    return model, tokenizer, adam
