"""The three stages get_gradients.py runs: build a target from anchors, score a pool against targets,
store projected per-example gradient features. Each is resumable and sharded through runner.py."""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ... import data as D
from ...config import ORIGINAL_QUIRKS_HELP, LoraArgs, StageArgs, module_names, option, shared
from ...distributed import close_distributed, init_distributed, rank_and_world
from ...errors import UserError
from ...models import default_device, load_tokenizer, resolve_dtype
from ...scores import SCORES_FILE, write_scores_csv
from ...store import (META, atomic_write_text, environment, model_key, now, parse_shard, require_same,
                      save_tensors, write_json)
from ...templates import choose_template
from ..runner import base_meta, check_existing_output, finish, prepare_data, run_chunked
from .anchors import anchor_gradients
from .batch import project_batch, projector_for, score_batch
from .engine import get_engine
from .lora import lora_settings, setup_model
from .sites import MODES, PARAMS, unwrap
from .bank import TargetBank
from .targets import (LAYOUTS, TARGET_FILE, TARGET_FORMAT, TARGET_VERSION, load_target, target_lock,
                      target_tensors_sha256)

log = logging.getLogger(__name__)


EXAMPLES_FILE = "examples.csv"
SELF_INFLUENCE_COLUMNS = ["self_inf", "self_inf_n"]
SELF_INFLUENCE_SCORE = ("self_inf = ||G_i||^2 (Self-Inf); self_inf_n = ln(self_inf + 1) + ln(n_supervised + 1) "
                        "(Self-Inf-N, Guan et al. 2025, arXiv 2505.06843)")
PRODUCTS_FILE = "products.safetensors"
FEATURES_FILE = "features.safetensors"
ANCHOR_COMBINATIONS = ("mean", "running_sum")
# Flags that define which gradient is computed: a target and a pool must agree on them.
GRADIENT_FLAGS = ("mode", "params", "lora")
WHAT = "what to compute (exactly one)"
LORA_PURPOSE = "--mode lora, a fresh adapter"


@dataclass(kw_only=True)
class GradientArgs:
    """get_gradients.py's settings (its flags are generated from these fields): which of the four computations
    (--anchor, --targets, --proj_dim, --self_influence), on which records, with which gradient."""

    model_name: str = option(help="Hugging Face id or local directory")
    data_path: str = option(help=f"anchor or pool records: {D.INPUT_TYPES}")
    output_dir: str = option(help="where the target / scores / features go (a rerun with the same settings resumes "
                                  "there)")
    anchor: bool = option(False, "build a target from this (anchor) file", group=WHAT)
    targets: list[str] | None = option(None, "score this (pool) file against targets", metavar="DIR", group=WHAT)
    proj_dim: int | None = option(None, "store per-example gradient projections of this size", group=WHAT)
    self_influence: bool = option(
        False, "anchor-free scores of this (pool) file: self_inf = ||G_i||^2 and its length-normalised "
               "self_inf_n = ln(self_inf + 1) + ln(n_supervised + 1) (Guan et al. 2025, Self-Inf-N)", group=WHAT)
    target_names: list[str] | None = option(None, "score column names (default: the target dir names)")
    renormalize: bool = option(False, "--anchor: store T/||T|| so scores are cos(G_i, T) (default: the paper's mean "
                                      "cosine)")
    target_layout: str = option("auto", "--anchor: per layer, store the target as scaled factors or dense (auto: "
                                        "whichever is smaller; scores are the same)", choices=LAYOUTS)
    anchor_combination: str = option(
        "mean", "--anchor: how the anchors' gradients make the target: mean = mean_a G_a/||G_a|| (the paper's "
                "method); running_sum = what the original code computed (gradients never zeroed between anchors: "
                "mean_i C_i/||C_i||, C_i = G_0 + ... + G_i in file order), under any template (--original_quirks "
                "implies it)", choices=ANCHOR_COMBINATIONS)
    proj_seed: int = option(0, "--proj_dim: projection seed (anchors and pool alike)")
    template: str | None = shared(StageArgs, "template")
    batch_size: int = option(8, "examples per forward + backward (an out-of-memory error names a smaller one to "
                                "try)")
    max_length: int | None = shared(StageArgs, "max_length")
    max_response_length: int | None = option(None, "keep only the first N supervised tokens (the paper: 10 for "
                                                   "anchors, all for the pool)")
    params: str = option("all", "all: every parameter, as the paper; linear: the decoder's Linear weights only "
                                "(attention + MLP; no embeddings, norms or LM head)", choices=PARAMS)
    mode: str = option("full", "full gradients, or LoRA gradients (LESS)", choices=MODES)
    lora_r: int = shared(LoraArgs, "lora_r", LORA_PURPOSE)
    lora_alpha: float = shared(LoraArgs, "lora_alpha", LORA_PURPOSE)
    lora_target_modules: list[str] = shared(LoraArgs, "lora_target_modules", LORA_PURPOSE)
    lora_path: str | None = option(None, "--mode lora: a trained peft adapter (else a fresh seeded one)")
    lora_seed: int = option(0, "--mode lora: seed of a fresh adapter's init")
    optimizer_state: str | None = option(None, "--mode lora: a Trainer's optimizer.pt; pool gradients become Adam "
                                               "update directions (LESS)")
    original_quirks: bool = shared(
        StageArgs, "original_quirks", help=ORIGINAL_QUIRKS_HELP + "; with --anchor also the original's target: "
        "gradients never zeroed between anchors, so anchor i contributes the normalised running sum G_0 + ... + "
        "G_i (file order), averaged over i")
    shard: str | None = shared(StageArgs, "shard")
    chunk_size: int = shared(StageArgs, "chunk_size")
    dtype: str | None = shared(StageArgs, "dtype")
    device: str | None = shared(StageArgs, "device")
    skip_bad: bool = shared(StageArgs, "skip_bad")
    field_map: str | None = shared(StageArgs, "field_map")

    def __post_init__(self):
        self.lora_target_modules = module_names(self.lora_target_modules)

    def computations(self) -> list[str]:
        """The flags of the computations asked for (a run asks for exactly one)."""
        return [flag for flag, on in (("--anchor", self.anchor), ("--targets", self.targets),
                                      ("--proj_dim", self.proj_dim is not None),
                                      ("--self_influence", self.self_influence)) if on]

    def lora(self) -> dict | None:
        """The adapter's settings recorded in meta.json (None in full mode)."""
        return lora_settings(self.mode, self.lora_r, self.lora_alpha, self.lora_target_modules, self.lora_path,
                             self.lora_seed)


def _dtype_name(model, dtype, device) -> str:
    if model is not None:
        return str(unwrap(model).get_input_embeddings().weight.dtype)
    return str(resolve_dtype(dtype, torch.device(device) if device is not None else default_device()))


def _flags(a: GradientArgs, model, **extra) -> dict:
    """meta.json's flags: what defines the gradient and the examples it is taken of (+ the stage's own)."""
    flags = {"mode": a.mode, "params": _params_key(a.mode, a.params), "lora": _lora_identity(a.lora()),
             "max_length": a.max_length, "max_response_length": a.max_response_length,
             "dtype": _dtype_name(model, a.dtype, a.device),
             "optimizer_state": _file_digest(a.optimizer_state) if a.optimizer_state else None,
             "original_quirks": bool(a.original_quirks)}
    flags.update(extra)
    return flags


def _lora_identity(lora: dict | None) -> dict | None:
    """The adapter as flags hold it: a given adapter by its files' digest, not its path (_meta records the path)."""
    return {k: v for k, v in lora.items() if k != "path"} if lora else lora


def _meta(stage: str, a: GradientArgs, prepared, template: str, flags: dict) -> dict:
    """base_meta, and the adapter's path (for a person; flags hold its content digest)."""
    meta = base_meta(stage, a.model_name, prepared, template, flags)
    if a.mode == "lora" and a.lora_path:
        meta["lora_path"] = str(Path(a.lora_path).resolve())
    return meta


def _encode(a: GradientArgs, tokenizer):
    """The template and the encoded records."""
    template = choose_template(a.model_name, a.template, tokenizer)
    return template, prepare_data(a.data_path, tokenizer, template, a.max_length, a.max_response_length, a.skip_bad,
                                  a.original_quirks, D.field_map_of(a.field_map))


def _setup(a: GradientArgs, model, tokenizer):
    """What scoring and features do first: the model (with its adapter and Adam state, unless given), the
    template and the encoded records."""
    model, tokenizer, adam = setup_model(a.model_name, a.dtype, a.device, a.mode, a.lora(), a.lora_path,
                                         a.optimizer_state, model, tokenizer)
    template, prepared = _encode(a, tokenizer)
    return model, tokenizer, adam, template, prepared


def _file_digest(path) -> str:
    return f"{Path(path).name}#{D.file_sha256(path)[:16]}"


def _params_key(mode, params):
    return params if mode == "full" else "lora"


def build_target(args: GradientArgs, model: torch.nn.Module | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None) -> bool:
    """Anchor mode: write target.safetensors + meta.json (stage gradient_target). Rank 0 only.
    original_quirks: what the original code computed: the supervised trailing space (data.token_ids) and
    anchor gradients never zeroed between anchors (anchors.py, cumulative)."""
    a = args
    # Flags first: the lock below creates the output dir, which a refused run must not leave behind.
    D.check_sizes(batch_size=a.batch_size, max_length=a.max_length, max_response_length=a.max_response_length)
    rank, world = rank_and_world()
    if rank != 0:
        torch.distributed.barrier()
        return False
    if tokenizer is None:
        tokenizer = load_tokenizer(a.model_name)
    template, prepared = _encode(a, tokenizer)
    params_key = _params_key(a.mode, a.params)
    running_sum = a.original_quirks or a.anchor_combination == "running_sum"
    # recorded only when asked for on its own, so every target made without it keeps its meta (and identity)
    asked = {"anchor_combination": "running_sum"} if running_sum and not a.original_quirks else {}
    flags = _flags(a, model, renormalize=bool(a.renormalize), **asked)
    meta = _meta("gradient_target", a, prepared, template, flags)
    output_dir = Path(a.output_dir)
    with target_lock(output_dir):
        check_existing_output(output_dir, meta)
        if (output_dir / META).exists() and (output_dir / TARGET_FILE).exists():
            log.info("%s: target already built with these settings (kept, not rebuilt)", output_dir)
        else:
            model, tokenizer, adam = setup_model(a.model_name, a.dtype, a.device, a.mode, a.lora(), a.lora_path,
                                                 a.optimizer_state, model, tokenizer)
            with stop_on_out_of_memory("anchor target", a.batch_size):
                result = anchor_gradients(model, prepared.encoded, D.pad_token_id(tokenizer), params_key, a.mode,
                                          a.batch_size, adam, a.renormalize, a.target_layout, progress=True,
                                          cumulative=running_sum)
            _write_target(output_dir, meta, result.target)
    if world > 1:
        torch.distributed.barrier()
    return True


def _write_target(output_dir: Path, meta: dict, target) -> None:
    n = len(target.anchor_sqnorm)
    meta["target"] = {
        "format": TARGET_FORMAT, "version": TARGET_VERSION, "n_anchors": n,
        "combination": ("mean_i C_i/||C_i||, C_i = G_0 + ... + G_i (the original's, --original_quirks)"
                        if meta["flags"]["original_quirks"] else
                        "mean_i C_i/||C_i||, C_i = G_0 + ... + G_i (the original's, --anchor_combination running_sum)"
                        if meta["flags"].get("anchor_combination") == "running_sum" else "mean_a G_a/||G_a||"),
        "norm": target.norm, "renormalized": target.renormalized,
        "anchor_norms": [math.sqrt(v) for v in target.anchor_sqnorm],
        # <G_a/||G_a||, T>: each anchor's score against its own (un-renormalised) target
        "anchor_scores": [i / math.sqrt(s) for i, s in zip(target.anchor_inner, target.anchor_sqnorm)],
        "bytes": sum(p.nbytes() for p in target.params.values()),
        "layout": target.layout(),
    }
    meta.update(created=now(), environment=environment())
    save_tensors(output_dir / TARGET_FILE, target.tensors(),
                 {"format": TARGET_FORMAT, "version": TARGET_VERSION, "model": model_key(meta["model"])})
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


def score_pool(args: GradientArgs, model: torch.nn.Module | None = None,
               tokenizer: PreTrainedTokenizerBase | None = None) -> bool:
    """Scoring mode: scores.csv + examples.csv + products.safetensors + meta.json (stage gradient_scores);
    True once complete. Against targets (one column each), or with self_influence and no targets the
    anchor-free columns self_inf and self_inf_n (see self_influence_n)."""
    a = args
    target_dirs, self_influence, output_dir = a.targets or [], a.self_influence, a.output_dir
    D.check_sizes(batch_size=a.batch_size, chunk_size=a.chunk_size, max_length=a.max_length,
                  max_response_length=a.max_response_length)  # before the model is loaded
    if self_influence and target_dirs:
        raise UserError("--self_influence needs no --targets (it is anchor-free): give one or the other")
    if not self_influence and not target_dirs:
        raise UserError("--targets: give at least one target dir (made with --anchor)")
    names = SELF_INFLUENCE_COLUMNS if self_influence else _target_names(target_dirs, a.target_names)
    model, tokenizer, adam, template, prepared = _setup(a, model, tokenizer)
    params_key = _params_key(a.mode, a.params)
    loaded = [load_target(d, defer_dense=True) for d in target_dirs]   # the bank reads the dense parts into place
    targets_info = [{"name": name, "dir": str(Path(d).resolve()), "data_file": tm.get("data_file"),
                     "data_sha256": tm.get("data_sha256"), "n_anchors": tm["target"]["n_anchors"],
                     "norm": tm["target"]["norm"], "renormalized": tm["target"]["renormalized"],
                     "sha256": D.file_sha256(Path(d) / TARGET_FILE),
                     "tensors_sha256": target_tensors_sha256(Path(d) / TARGET_FILE), "flags": tm.get("flags")}
                    for name, d, (_, tm) in zip(names, target_dirs, loaded)]
    # The chunks' fingerprint holds each target's tensors' hash (not the file's: its metadata may name a path, and
    # a target moved or rebuilt to the same tensors keeps the chunks): chunks scored against other target values
    # are stale, and shards that read the same file agree (a norm recomputed by another builder would not).
    identity = ("name", "data_sha256", "n_anchors", "renormalized", "tensors_sha256")
    flags = _flags(a, model, targets=[{k: t[k] for k in identity} for t in targets_info],
                   self_influence=bool(self_influence))
    meta = _meta("gradient_scores", a, prepared, template, flags)
    for (target, tm), d in zip(loaded, target_dirs):
        require_same(meta, tm, ("model", "template"), "this run", f"target {d}")
        require_same(flags, tm.get("flags") or {}, GRADIENT_FLAGS, "this run", f"target {d}")
    meta["targets"] = targets_info
    meta["score"] = (SELF_INFLUENCE_SCORE if self_influence else
                     "<G_i, T_j> / ||G_i|| = mean over anchors of cos(G_i, G_a); cos(G_i, T_j) for a "
                     "renormalised target")
    check_existing_output(output_dir, meta)
    engine = get_engine(model, params_key, a.mode, adam)
    bank = TargetBank([t for t, _ in loaded], engine, release=True)    # no targets (Self-Inf): norms only
    del loaded
    pad_id = D.pad_token_id(tokenizer)
    n_supervised = torch.tensor([e.n_supervised for e in prepared.encoded], dtype=torch.float64)

    def compute(items):
        scores = score_batch(engine, bank, items, pad_id)
        return {"inner": scores.inner.detach().double().cpu(), "sqnorm": scores.sqnorm.detach().double().cpu(),
                "loss": scores.loss.detach().double().cpu()}

    with stop_on_out_of_memory("gradient scores", a.batch_size):
        store = run_chunked(output_dir, meta, prepared, compute, a.batch_size, a.chunk_size, parse_shard(a.shard),
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


def extract_gradient_features(args: GradientArgs, model: torch.nn.Module | None = None,
                              tokenizer: PreTrainedTokenizerBase | None = None) -> bool:
    """--proj_dim: features.safetensors [N, proj_dim] (stage gradient_features), rank.py reads it."""
    a = args
    output_dir = a.output_dir
    D.check_sizes(proj_dim=a.proj_dim, batch_size=a.batch_size, chunk_size=a.chunk_size, max_length=a.max_length,
                  max_response_length=a.max_response_length)  # before the model is loaded
    model, tokenizer, adam, template, prepared = _setup(a, model, tokenizer)
    params_key = _params_key(a.mode, a.params)
    flags = _flags(a, model, proj_dim=int(a.proj_dim), proj_seed=int(a.proj_seed))
    meta = _meta("gradient_features", a, prepared, template, flags)
    check_existing_output(output_dir, meta)
    engine = get_engine(model, params_key, a.mode, adam)
    projector = projector_for(engine, int(a.proj_dim), int(a.proj_seed))
    pad_id = D.pad_token_id(tokenizer)

    def compute(items):
        return {"features": project_batch(engine, projector, items, pad_id).detach().float().cpu()}

    with stop_on_out_of_memory("gradient features", a.batch_size):
        store = run_chunked(output_dir, meta, prepared, compute, a.batch_size, a.chunk_size, parse_shard(a.shard),
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


def run_gradients(args: GradientArgs) -> bool:
    """get_gradients.py: the one computation args ask for (exactly one of --anchor, --targets, --proj_dim,
    --self_influence), inside the torchrun process group when launched by torchrun."""
    chosen = args.computations()
    if len(chosen) != 1:
        raise UserError("give exactly one of --anchor, --targets, --proj_dim, --self_influence"
                        + (f" (got {', '.join(chosen)})" if chosen else ""))
    created = init_distributed()
    try:
        if args.anchor:
            return build_target(args)
        if args.proj_dim is not None:
            return extract_gradient_features(args)
        return score_pool(args)
    finally:
        close_distributed(created)
