"""The three stages get_gradients.py runs: build a target from anchors, score a pool against targets,
store projected per-example gradient features. Each is resumable and sharded through runner.py."""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
from pathlib import Path

import torch

from ... import data as D
from ...distributed import rank_and_world
from ...errors import UserError
from ...models import default_device, load_tokenizer, resolve_dtype
from ...scores import SCORES_FILE, write_scores_csv
from ...store import (META, atomic_write_text, environment, now, parse_shard, require_same,
                      save_tensors, write_json)
from ...templates import choose_template
from ..runner import base_meta, check_existing_output, finish, prepare_data, run_chunked
from .anchors import anchor_gradients
from .batch import project_batch, projector_for, score_batch
from .engine import get_engine
from .lora import lora_settings, setup_model
from .sites import unwrap
from .bank import TargetBank
from .targets import TARGET_FILE, TARGET_FORMAT, TARGET_VERSION, load_target, target_lock

log = logging.getLogger(__name__)


EXAMPLES_FILE = "examples.csv"
SELF_INFLUENCE_COLUMNS = ["self_inf", "self_inf_n"]
SELF_INFLUENCE_SCORE = ("self_inf = ||G_i||^2 (Self-Inf); self_inf_n = ln(self_inf + 1) + ln(n_supervised + 1) "
                        "(Self-Inf-N, Guan et al. 2025, arXiv 2505.06843)")
PRODUCTS_FILE = "products.safetensors"
FEATURES_FILE = "features.safetensors"
# Flags that define which gradient is computed: a target and a pool must agree on them.
GRADIENT_FLAGS = ("mode", "params", "lora")


def _dtype_name(model, dtype, device) -> str:
    if model is not None:
        return str(unwrap(model).get_input_embeddings().weight.dtype)
    return str(resolve_dtype(dtype, torch.device(device) if device is not None else default_device()))


def _flags(mode, params, lora, max_length, max_response_length, dtype_name, optimizer_state, original_quirks,
           **extra) -> dict:
    flags = {"mode": mode, "params": params if mode == "full" else "lora", "lora": lora,
             "max_length": max_length, "max_response_length": max_response_length, "dtype": dtype_name,
             "optimizer_state": _file_digest(optimizer_state) if optimizer_state else None,
             "original_quirks": bool(original_quirks)}
    flags.update(extra)
    return flags


def _file_digest(path) -> str:
    return f"{Path(path).name}#{D.file_sha256(path)[:16]}"


def _params_key(mode, params):
    return params if mode == "full" else "lora"


def build_target(model_name, data_path, output_dir, template=None, batch_size=8, max_length=None,
                 max_response_length=None, params="all", mode="full", lora_r=8, lora_alpha=32,
                 lora_target_modules=("q_proj", "v_proj"), lora_path=None, lora_seed=0, optimizer_state=None,
                 renormalize=False, layout="auto", dtype=None, device=None, skip_bad=False, model=None,
                 tokenizer=None, original_quirks=False) -> bool:
    """Anchor mode: write target.safetensors + meta.json (stage gradient_target). Rank 0 only.
    original_quirks: what the original code computed: the supervised trailing space (data.token_ids) and
    anchor gradients never zeroed between anchors (anchors.py, cumulative)."""
    # Flags first: the lock below creates the output dir, which a refused run must not leave behind.
    D.check_sizes(batch_size=batch_size, max_length=max_length, max_response_length=max_response_length)
    rank, world = rank_and_world()
    if rank != 0:
        torch.distributed.barrier()
        return False
    lora = lora_settings(mode, lora_r, lora_alpha, lora_target_modules, lora_path, lora_seed)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name)
    template = choose_template(model_name, template, tokenizer)
    prepared = prepare_data(data_path, tokenizer, template, max_length, max_response_length, skip_bad,
                            original_quirks)
    params_key = _params_key(mode, params)
    flags = _flags(mode, params_key, lora, max_length, max_response_length, _dtype_name(model, dtype, device),
                   optimizer_state, original_quirks, renormalize=bool(renormalize))
    meta = base_meta("gradient_target", model_name, prepared, template, flags)
    output_dir = Path(output_dir)
    with target_lock(output_dir):
        check_existing_output(output_dir, meta)
        if (output_dir / META).exists() and (output_dir / TARGET_FILE).exists():
            log.info("%s: target already built with these settings (kept, not rebuilt)", output_dir)
        else:
            model, tokenizer, adam = setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state,
                                                 model, tokenizer)
            with stop_on_out_of_memory("anchor target", batch_size):
                result = anchor_gradients(model, prepared.encoded, D.pad_token_id(tokenizer), params_key, mode,
                                          batch_size, adam, renormalize, layout, progress=True,
                                          cumulative=original_quirks)
            _write_target(output_dir, meta, result.target)
    if world > 1:
        torch.distributed.barrier()
    return True


def _write_target(output_dir: Path, meta: dict, target) -> None:
    n = len(target.anchor_sqnorm)
    meta["target"] = {
        "format": TARGET_FORMAT, "version": TARGET_VERSION, "n_anchors": n,
        "combination": ("mean_i C_i/||C_i||, C_i = G_0 + ... + G_i (the original's, --original_quirks)"
                        if meta["flags"]["original_quirks"] else "mean_a G_a/||G_a||"),
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
    write_json(output_dir / META, meta)     # last: a target dir with meta.json is complete
    log.info("wrote %s (%d anchors, %.1f MB, ||T|| = %.4g)", output_dir / TARGET_FILE, n,
             meta["target"]["bytes"] / 2**20, target.norm)


@contextlib.contextmanager
def stop_on_out_of_memory(stage: str, batch_size: int):
    """An out-of-memory error ends the stage with one line naming it, the batch size and a smaller one to try
    (nothing is retried: a retry would need at least as much memory)."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        detail = (str(err).strip().splitlines() or ["out of memory"])[0][:160]
        hint = (f"try --batch_size {batch_size // 2}" if batch_size > 1 else
                "batch size 1 does not fit: try a smaller --max_length, --params linear or a larger device")
        raise UserError(f"{stage}: out of memory at --batch_size {batch_size} ({detail}); {hint}; "
                        "finished chunks are kept and a rerun resumes") from None


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


def self_influence_n(self_inf: torch.Tensor, n_answer_tokens: torch.Tensor) -> torch.Tensor:
    """Self-Inf-N, the length-normalised self-influence of Guan et al., "Benign Samples Matter! Fine-tuning
    On Outlier Benign Samples Severely Breaks Safety" (ICML 2025, arXiv 2505.06843, Section 4):

        Self-Inf(z)   = <grad l(z), grad l(z)> = ||G_z||^2      (the example's full loss gradient)
        Self-Inf-N(z) = log(Self-Inf(z) + 1) + log(len(a) + 1)

    with len(a) the token length of the example's answer a: here its supervised tokens (the response and the
    end-of-sequence token the template supervises; after --max_response_length if given). The paper adds the
    length term because plain Self-Inf favours short answers. Natural logarithm: another base scales both
    terms alike and leaves the ranking unchanged."""
    return torch.log1p(self_inf) + torch.log1p(n_answer_tokens.to(self_inf.dtype))


def score_pool(model_name, data_path, output_dir, target_dirs, target_names=None, template=None, batch_size=8,
               max_length=None, max_response_length=None, params="all", mode="full", lora_r=8, lora_alpha=32,
               lora_target_modules=("q_proj", "v_proj"), lora_path=None, lora_seed=0, optimizer_state=None,
               shard=None, chunk_size=512, dtype=None, device=None, skip_bad=False, path="auto", model=None,
               tokenizer=None, self_influence=False, original_quirks=False) -> bool:
    """Scoring mode: scores.csv + examples.csv + products.safetensors + meta.json (stage gradient_scores);
    True once complete. Against targets (one column each), or with self_influence and no targets the
    anchor-free columns self_inf and self_inf_n (see self_influence_n)."""
    D.check_sizes(batch_size=batch_size, chunk_size=chunk_size, max_length=max_length,
                  max_response_length=max_response_length)  # before the model is loaded
    if self_influence and target_dirs:
        raise UserError("--self_influence needs no --targets (it is anchor-free): give one or the other")
    if not self_influence and not target_dirs:
        raise UserError("--targets: give at least one target dir (made with --anchor)")
    names = SELF_INFLUENCE_COLUMNS if self_influence else _target_names(target_dirs, target_names)
    lora = lora_settings(mode, lora_r, lora_alpha, lora_target_modules, lora_path, lora_seed)
    model, tokenizer, adam = setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state,
                                         model, tokenizer)
    template = choose_template(model_name, template, tokenizer)
    prepared = prepare_data(data_path, tokenizer, template, max_length, max_response_length, skip_bad,
                            original_quirks)
    params_key = _params_key(mode, params)
    loaded = [load_target(d) for d in target_dirs]
    targets_info = [{"name": name, "dir": str(Path(d).resolve()), "data_file": tm.get("data_file"),
                     "data_sha256": tm.get("data_sha256"), "n_anchors": tm["target"]["n_anchors"],
                     "norm": tm["target"]["norm"], "renormalized": tm["target"]["renormalized"],
                     "sha256": D.file_sha256(Path(d) / TARGET_FILE), "flags": tm.get("flags")}
                    for name, d, (_, tm) in zip(names, target_dirs, loaded)]
    # The chunks' fingerprint holds each target file's hash: chunks scored against other target bytes are
    # stale, and shards that read the same file agree (a norm recomputed by another builder would not).
    identity = ("name", "data_sha256", "n_anchors", "renormalized", "sha256")
    flags = _flags(mode, params_key, lora, max_length, max_response_length, _dtype_name(model, dtype, device),
                   optimizer_state, original_quirks, targets=[{k: t[k] for k in identity} for t in targets_info],
                   self_influence=bool(self_influence))
    meta = base_meta("gradient_scores", model_name, prepared, template, flags)
    for (target, tm), d in zip(loaded, target_dirs):
        require_same(meta, tm, ("model", "template"), "this run", f"target {d}")
        require_same(flags, tm.get("flags") or {}, GRADIENT_FLAGS, "this run", f"target {d}")
    meta["targets"] = targets_info
    meta["score"] = (SELF_INFLUENCE_SCORE if self_influence else
                     "<G_i, T_j> / ||G_i|| = mean over anchors of cos(G_i, G_a); cos(G_i, T_j) for a "
                     "renormalised target")
    check_existing_output(output_dir, meta)
    engine = get_engine(model, params_key, mode, adam, path)
    bank = TargetBank([t for t, _ in loaded], engine, release=True) if loaded else None
    del loaded
    pad_id = D.pad_token_id(tokenizer)
    n_supervised = torch.tensor([e.n_supervised for e in prepared.encoded], dtype=torch.float64)

    def compute(items):
        inner, sq, loss = score_batch(model, items, bank, pad_id, params_key, mode, adam, path, with_loss=True)
        return {"inner": inner.detach().double().cpu(), "sqnorm": sq.detach().double().cpu(),
                "loss": loss.detach().double().cpu()}

    with stop_on_out_of_memory("gradient scores", batch_size):
        store = run_chunked(output_dir, meta, prepared, compute, batch_size, chunk_size, parse_shard(shard),
                            desc="gradient scores")

    def write(tensors, meta_out):
        inner, sq = tensors["inner"], tensors["sqnorm"]
        if self_influence:
            scores = torch.stack([sq, self_influence_n(sq, n_supervised)], 1)
            usable = torch.isfinite(sq)                        # a zero gradient is a valid Self-Inf (0)
        else:
            scores = inner / sq.sqrt()[:, None]
            usable = torch.isfinite(sq) & torch.isfinite(inner).all(1) & (sq > 0)
        nonfinite = []
        for row, (index, ex_id) in enumerate(zip(meta_out["indices"], meta_out["ids"])):
            if not bool(usable[row]):
                reason = "zero gradient" if bool(torch.isfinite(sq[row])) and float(sq[row]) <= 0 else \
                    "non-finite gradient"
                nonfinite.append({"index": index, "id": ex_id, "reason": reason})
        if nonfinite:
            log.warning("%d example(s) with a non-finite or zero gradient are not scored: ids %s", len(nonfinite),
                        ", ".join(e["id"] for e in nonfinite[:20]))
        meta_out["nonfinite"] = nonfinite
        meta_out["n_scored"] = len(meta_out["ids"]) - len(nonfinite)
        save_tensors(Path(output_dir) / PRODUCTS_FILE, {"inner": inner, "sqnorm": sq},
                     {"model": meta_out["model"], "data_sha256": meta_out["data_sha256"]})
        _write_examples(Path(output_dir) / EXAMPLES_FILE, meta_out, n_supervised, tensors["loss"])
        write_scores_csv(output_dir, meta_out["indices"], meta_out["ids"],
                         {name: scores[:, column] for column, name in enumerate(names)},
                         rows=[row for row in range(len(meta_out["ids"])) if bool(usable[row])])

    return finish(output_dir, store, meta, SCORES_FILE, write)


def _write_examples(path: Path, meta: dict, n_supervised: torch.Tensor, loss: torch.Tensor) -> None:
    """examples.csv: every scored example's number of supervised tokens and mean token loss (file order)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "id", "n_supervised", "loss"])
    for row, (index, ex_id) in enumerate(zip(meta["indices"], meta["ids"])):
        writer.writerow([index, ex_id, int(n_supervised[row]), repr(float(loss[row]))])
    atomic_write_text(path, buffer.getvalue())


def extract_gradient_features(model_name, data_path, output_dir, proj_dim, proj_seed=0, template=None,
                              batch_size=8, max_length=None, max_response_length=None, params="all", mode="full",
                              lora_r=8, lora_alpha=32, lora_target_modules=("q_proj", "v_proj"), lora_path=None,
                              lora_seed=0, optimizer_state=None, shard=None, chunk_size=512, dtype=None,
                              device=None, skip_bad=False, model=None, tokenizer=None, original_quirks=False) -> bool:
    """--proj_dim: features.safetensors [N, proj_dim] (stage gradient_features), rank.py reads it."""
    D.check_sizes(proj_dim=proj_dim, batch_size=batch_size, chunk_size=chunk_size, max_length=max_length,
                  max_response_length=max_response_length)  # before the model is loaded
    lora = lora_settings(mode, lora_r, lora_alpha, lora_target_modules, lora_path, lora_seed)
    model, tokenizer, adam = setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state,
                                         model, tokenizer)
    template = choose_template(model_name, template, tokenizer)
    prepared = prepare_data(data_path, tokenizer, template, max_length, max_response_length, skip_bad,
                            original_quirks)
    params_key = _params_key(mode, params)
    flags = _flags(mode, params_key, lora, max_length, max_response_length, _dtype_name(model, dtype, device),
                   optimizer_state, original_quirks, proj_dim=int(proj_dim), proj_seed=int(proj_seed))
    meta = base_meta("gradient_features", model_name, prepared, template, flags)
    check_existing_output(output_dir, meta)
    engine = get_engine(model, params_key, mode, adam)
    projector = projector_for(engine, int(proj_dim), int(proj_seed))
    pad_id = D.pad_token_id(tokenizer)

    def compute(items):
        return {"features": project_batch(model, items, projector, pad_id, params_key, mode, adam).detach().float().cpu()}

    with stop_on_out_of_memory("gradient features", batch_size):
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
