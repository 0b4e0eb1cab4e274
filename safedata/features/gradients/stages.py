"""The three stages get_gradients.py runs: build a target from anchors, score a pool against targets,
store projected per-example gradient features. Each is resumable and sharded through runner.py."""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
from pathlib import Path

import torch

from ... import data as D
from ...errors import UserError
from ...models import default_device, load_tokenizer, resolve_dtype
from ...store import (META, atomic_write_text, distributed_rank, environment, now, parse_shard, require_same,
                      save_tensors, write_json)
from ..runner import base_meta, check_existing_output, finish, prepare_data, run_chunked
from .anchors import anchor_gradients
from .batch import project_batch, projector_for, score_batch
from .engine import get_engine
from .lora import lora_settings, setup_model
from .sites import unwrap
from .targets import TARGET_FILE, TARGET_FORMAT, TARGET_VERSION, TargetBank, load_target

log = logging.getLogger(__name__)

SCORES_FILE = "scores.csv"
PRODUCTS_FILE = "products.safetensors"
FEATURES_FILE = "features.safetensors"
# Flags that define which gradient is computed: a target and a pool must agree on them.
GRADIENT_FLAGS = ("mode", "params", "lora")


def _dtype_name(model, dtype, device) -> str:
    if model is not None:
        return str(unwrap(model).get_input_embeddings().weight.dtype)
    return str(resolve_dtype(dtype, torch.device(device) if device is not None else default_device()))


def _flags(mode, params, lora, max_length, max_response_length, dtype_name, optimizer_state, **extra) -> dict:
    flags = {"mode": mode, "params": params if mode == "full" else "lora", "lora": lora,
             "max_length": max_length, "max_response_length": max_response_length, "dtype": dtype_name,
             "optimizer_state": _file_digest(optimizer_state) if optimizer_state else None}
    flags.update(extra)
    return flags


def _file_digest(path) -> str:
    return f"{Path(path).name}#{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"


def _params_key(mode, params):
    return params if mode == "full" else "lora"


def build_target(model_name, data_path, output_dir, template="paper", batch_size=8, max_length=None,
                 max_response_length=None, params="all", mode="full", lora_r=8, lora_alpha=32,
                 lora_target_modules=("q_proj", "v_proj"), lora_path=None, lora_seed=0, optimizer_state=None,
                 renormalize=False, layout="auto", dtype=None, device=None, skip_bad=False, model=None,
                 tokenizer=None) -> bool:
    """Anchor mode: write target.safetensors + meta.json (stage gradient_target). Rank 0 only."""
    rank, world = distributed_rank()
    if rank != 0:
        torch.distributed.barrier()
        return False
    lora = lora_settings(mode, lora_r, lora_alpha, lora_target_modules, lora_path, lora_seed)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name)
    prepared = prepare_data(data_path, tokenizer, template, max_length, max_response_length, skip_bad)
    params_key = _params_key(mode, params)
    flags = _flags(mode, params_key, lora, max_length, max_response_length, _dtype_name(model, dtype, device),
                   optimizer_state, renormalize=bool(renormalize))
    meta = base_meta("gradient_target", model_name, prepared, template, flags)
    output_dir = Path(output_dir)
    check_existing_output(output_dir, meta)
    if (output_dir / META).exists() and (output_dir / TARGET_FILE).exists():
        log.info("%s: target already built with these settings (not rebuilt)", output_dir)
        if world > 1:
            torch.distributed.barrier()
        return True
    model, tokenizer, adam = setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state,
                                         model, tokenizer)
    pad_id = D.pad_token_id(tokenizer)
    result = anchor_gradients(model, prepared.encoded, pad_id, params_key, mode, batch_size, adam, renormalize,
                              layout, progress=True)
    target = result.target
    n = len(prepared.encoded)
    meta["target"] = {
        "format": TARGET_FORMAT, "version": TARGET_VERSION, "n_anchors": n,
        "norm": target.norm, "renormalized": target.renormalized,
        "anchor_norms": [math.sqrt(v) for v in target.anchor_sqnorm],
        # <G_a/||G_a||, T>: each anchor's score against its own (un-renormalised) target
        "anchor_scores": [i / math.sqrt(s) for i, s in zip(target.anchor_inner, target.anchor_sqnorm)],
        "bytes": sum(p.nbytes() for p in target.params.values()),
        "layout": target.layout(),
    }
    meta.update(created=now(), environment=environment())
    save_tensors(output_dir / TARGET_FILE, target.tensors(),
                 {"format": TARGET_FORMAT, "version": TARGET_VERSION, "model": meta["model"]})
    write_json(output_dir / META, meta)
    log.info("wrote %s (%d anchors, %.1f MB, ||T|| = %.4g)", output_dir / TARGET_FILE, n,
             meta["target"]["bytes"] / 2**20, target.norm)
    if world > 1:
        torch.distributed.barrier()
    return True


def _target_names(dirs, names):
    if names:
        if len(names) != len(dirs):
            raise UserError(f"--target_names: {len(names)} name(s) for {len(dirs)} target dir(s)")
        if len(set(names)) != len(names) or any(n in ("index", "id") or not n for n in names):
            raise UserError("--target_names must be distinct, non-empty and not 'index' or 'id'")
        return list(names)
    out = []
    for d in dirs:
        name = Path(d).resolve().name
        out.append(name if name not in out and name not in ("index", "id") else f"{name}_{len(out)}")
    return out


def score_pool(model_name, data_path, output_dir, target_dirs, target_names=None, template="paper", batch_size=8,
               max_length=None, max_response_length=None, params="all", mode="full", lora_r=8, lora_alpha=32,
               lora_target_modules=("q_proj", "v_proj"), lora_path=None, lora_seed=0, optimizer_state=None,
               shard=None, chunk_size=512, dtype=None, device=None, skip_bad=False, path="auto", model=None,
               tokenizer=None) -> bool:
    """Scoring mode: scores.csv + products.safetensors + meta.json (stage gradient_scores); True once complete."""
    if not target_dirs:
        raise UserError("--targets: give at least one target dir (made with --anchor)")
    names = _target_names(target_dirs, target_names)
    lora = lora_settings(mode, lora_r, lora_alpha, lora_target_modules, lora_path, lora_seed)
    model, tokenizer, adam = setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state,
                                         model, tokenizer)
    prepared = prepare_data(data_path, tokenizer, template, max_length, max_response_length, skip_bad)
    params_key = _params_key(mode, params)
    loaded = [load_target(d) for d in target_dirs]
    targets_info = [{"name": name, "dir": str(Path(d).resolve()), "data_file": tm.get("data_file"),
                     "data_sha256": tm.get("data_sha256"), "n_anchors": tm["target"]["n_anchors"],
                     "norm": tm["target"]["norm"], "renormalized": tm["target"]["renormalized"],
                     "flags": tm.get("flags")}
                    for name, d, (_, tm) in zip(names, target_dirs, loaded)]
    flags = _flags(mode, params_key, lora, max_length, max_response_length, _dtype_name(model, dtype, device),
                   optimizer_state, targets=[{k: t[k] for k in ("name", "data_sha256", "n_anchors", "norm", "renormalized")}
                            for t in targets_info])
    meta = base_meta("gradient_scores", model_name, prepared, template, flags)
    for (target, tm), d in zip(loaded, target_dirs):
        require_same(meta, tm, ("model", "template"), "this run", f"target {d}")
        require_same(flags, tm.get("flags") or {}, GRADIENT_FLAGS, "this run", f"target {d}")
    meta["targets"] = targets_info
    meta["score"] = ("<G_i, T_j> / ||G_i|| = mean over anchors of cos(G_i, G_a); cos(G_i, T_j) for a "
                     "renormalised target")
    check_existing_output(output_dir, meta)
    engine = get_engine(model, params_key, mode, adam, path)
    bank = TargetBank([t for t, _ in loaded], engine)
    del loaded
    pad_id = D.pad_token_id(tokenizer)

    def compute(items):
        inner, sq = score_batch(model, items, bank, pad_id)
        return {"inner": inner.detach().double().cpu(), "sqnorm": sq.detach().double().cpu()}

    store = run_chunked(output_dir, meta, prepared, compute, batch_size, chunk_size, parse_shard(shard),
                        desc="gradient scores")

    def write(tensors, meta_out):
        inner, sq = tensors["inner"], tensors["sqnorm"]
        norm = sq.sqrt()
        scores = inner / norm[:, None]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["index", "id", *names])
        nonfinite = []
        for row, (index, ex_id) in enumerate(zip(meta_out["indices"], meta_out["ids"])):
            if not bool(torch.isfinite(sq[row])) or not bool(torch.isfinite(inner[row]).all()):
                nonfinite.append({"index": index, "id": ex_id, "reason": "non-finite gradient"})
            elif float(sq[row]) <= 0:
                nonfinite.append({"index": index, "id": ex_id, "reason": "zero gradient"})
            else:
                writer.writerow([index, ex_id, *(repr(float(v)) for v in scores[row])])
        if nonfinite:
            log.warning("%d example(s) with a non-finite or zero gradient are not scored: ids %s", len(nonfinite),
                        ", ".join(e["id"] for e in nonfinite[:20]))
        meta_out["nonfinite"] = nonfinite
        meta_out["n_scored"] = len(meta_out["ids"]) - len(nonfinite)
        save_tensors(Path(output_dir) / PRODUCTS_FILE, {"inner": inner, "sqnorm": sq},
                     {"model": meta_out["model"], "data_sha256": meta_out["data_sha256"]})
        atomic_write_text(Path(output_dir) / SCORES_FILE, buffer.getvalue())

    return finish(output_dir, store, meta, SCORES_FILE, write)


def extract_gradient_features(model_name, data_path, output_dir, proj_dim, proj_seed=0, template="paper",
                              batch_size=8, max_length=None, max_response_length=None, params="all", mode="full",
                              lora_r=8, lora_alpha=32, lora_target_modules=("q_proj", "v_proj"), lora_path=None,
                              lora_seed=0, optimizer_state=None, shard=None, chunk_size=512, dtype=None,
                              device=None, skip_bad=False, model=None, tokenizer=None) -> bool:
    """--proj_dim: features.safetensors [N, proj_dim] (stage gradient_features), rank.py reads it."""
    lora = lora_settings(mode, lora_r, lora_alpha, lora_target_modules, lora_path, lora_seed)
    model, tokenizer, adam = setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state,
                                         model, tokenizer)
    prepared = prepare_data(data_path, tokenizer, template, max_length, max_response_length, skip_bad)
    params_key = _params_key(mode, params)
    flags = _flags(mode, params_key, lora, max_length, max_response_length, _dtype_name(model, dtype, device),
                   optimizer_state, proj_dim=int(proj_dim), proj_seed=int(proj_seed))
    meta = base_meta("gradient_features", model_name, prepared, template, flags)
    check_existing_output(output_dir, meta)
    engine = get_engine(model, params_key, mode, adam)
    projector = projector_for(engine, int(proj_dim), int(proj_seed))
    pad_id = D.pad_token_id(tokenizer)

    def compute(items):
        return {"features": project_batch(model, items, projector, pad_id, params_key, mode, adam).detach().float().cpu()}

    store = run_chunked(output_dir, meta, prepared, compute, batch_size, chunk_size, parse_shard(shard),
                        desc="gradient features")

    def write(tensors, meta_out):
        features = tensors["features"]
        bad = (~torch.isfinite(features).all(1)).nonzero().flatten().tolist()
        meta_out["nonfinite"] = [{"index": meta_out["indices"][r], "id": meta_out["ids"][r],
                                  "reason": "non-finite gradient"} for r in bad]
        if bad:
            log.warning("%d example(s) with a non-finite gradient (NaN feature rows): ids %s", len(bad),
                        ", ".join(meta_out["ids"][r] for r in bad[:20]))
        meta_out["dim"] = int(features.shape[1])
        meta_out["projection"] = {k: v for k, v in projector.state_dict().items() if k != "plans"}
        save_tensors(Path(output_dir) / FEATURES_FILE, {"features": features},
                     {"model": meta_out["model"], "data_sha256": meta_out["data_sha256"]})

    return finish(output_dir, store, meta, FEATURES_FILE, write)
