"""Gradient similarity, the paper's method: each pool example's loss gradient against anchor targets.

What is computed
----------------
For an example i with tokens supervised by the data template, the loss is its own token mean
L_i = mean_t CE_t, and G_i = dL_i/dtheta over the chosen parameters (default: all of them, as the paper:
embeddings, every Linear, RMSNorm weights, LM head; a tied embedding/LM-head weight counts once, its
gradient being the sum of both uses; `--params linear`: only the decoder's Linear weights, attention +
MLP, LESS-like, no embeddings, norms or LM head). An anchor file gives the target

    T = (1/N) sum_a G_a / ||G_a||                  (not re-normalised unless --renormalize)

and a pool example's score against a target is

    score_i = <G_i, T> / ||G_i|| = mean_a cos(G_i, G_a)

i.e. the paper's (and LESS's) score: the normalised pool gradient against the mean normalised anchor
gradient. With `--renormalize` the stored target is T/||T|| and the score is exactly cos(G_i, T).
||T|| is always recorded in the target's meta.json (`target.norm`), so one converts between the two.

How, without per-example gradient vectors
-----------------------------------------
One batched forward + backward per batch, with every weight's requires_grad off (no .grad buffer, no
weight-gradient matmuls). The batch loss is sum_i L_i, so the output-gradient a hook sees at a token of
example i is example i's own. The input embeddings' output is made a leaf that requires grad, so the
backward flows through activations only. Forward hooks keep each Linear's input x; a tensor hook on its
output receives g = dL/d(output) and, right there, computes for the layer (W = sum_t g_t x_t^T per example):

* ||G_i,W||^2 either by "ghost" Gram products sum_{t,t'} (g_t.g_t')(x_t.x_t')  (cost T^2 (in+out)) or by
  materialising that one layer's per-example gradient (T in out, chunks of examples, a reused buffer
  off CUDA), whichever is cheaper for the batch (`linear_costs`: multiply-adds, plus the passes over a
  materialised gradient weighted by the device's compute/bandwidth ratio, MEMORY_COST);
* <G_i,W, T_j,W> for every target j: against a factored target (anchor tokens k, scaled factors
  T = sum_k s_k G_k X_k^T) as sum_{t,k} (g_t.G_k)(x_t.X_k) (cost T K (in+out)), against a dense one as
  sum_t g_t^T T x_t, or from the materialised gradient when that is cheaper (one GEMM against all dense
  targets of the layer); all targets of a layer in one product, the per-token sums folded into a
  [K, n_targets] matrix. Where the factor products of a layer would cost more than materialising it (many
  anchor tokens, e.g. 3 targets x 100 head tokens against a narrow LM head), the TargetBank adds a dense
  copy of its factored targets (`TargetBank.densify`, within a memory budget) and that layer materialises;
* norm weights (y = w * n(x)): per-example dL/dw = sum_t g_t * n(x_t), n recomputed from the saved
  input by calling the module with w = 1 and w = 0 (exact for RMSNorm);
* embeddings: per (example, token id) rows of the gradient, summed exactly (scatter-add), never a
  vocab x d matrix per example (a token equal to the Embedding's padding_idx adds nothing, as in autograd);
* a tied embedding / LM head: the shared weight's gradient is E_i + H_i; the cross term 2<E_i, H_i> =
  2 sum_{t,s} h-grad_s[id_t] (g_t . h_s) is added (the head's part is kept from its hook until the
  embedding's, as a [B, S, T] tensor).
Products run in fp32 (fp64 for fp64 models): on CUDA low-precision operands go to fp32-output matmuls
(torch.mm(..., out_dtype=float32)), elsewhere they are upcast. Padding is on the right of a causal LM: a
padded position's output-grad is exactly zero and its input finite, so it adds nothing to any product and
no masking copy is made. Results accumulate in [B, n_targets] and [B] buffers; each layer's saved input is
dropped as soon as its backward hook has run.

Exact vs approximate: the scores are exact (up to floating-point summation order) for all of the above.
`--proj_dim` features are random projections (projection.py): unbiased, approximate.

LoRA mode (`--mode lora`, LESS-style)
-------------------------------------
Gradients of the LoRA A and B matrices only (peft; r, alpha, target modules configurable, defaults r=8,
alpha=32, q_proj,v_proj; or an adapter from `--lora_path`). Per-example LoRA gradients are small and are
materialised (one layer at a time). With `--optimizer_state optimizer.pt` (a Trainer's torch-saved Adam
state; index n = the n-th trainable parameter, as LESS reads it) each per-example gradient is replaced by
the Adam update direction (beta1 m + (1-beta1) g) / (sqrt(beta2 v + (1-beta2) g^2) + eps) (LESS puts eps
inside the sqrt; the difference is ~1e-8). LESS applies it to the training pool only: pass it to the
scoring run, not to the anchor run. Note: a fresh adapter (peft's init: random A, B = 0) has dL/dA = 0
exactly, so only B's gradient counts; LESS warms the adapter up first (train briefly, pass --lora_path).

Memory (Llama-2-7B, bf16 on GPU)
--------------------------------
Weights 13.5 GB. No gradient buffers, no optimizer state. Activations of one forward+backward of a batch
(as a training step; weights frozen, so the backward also skips the weight-gradient matmuls), plus per
layer transient products: Gram matrices B*T^2 fp32, factor products B*T*K fp32 (chunked to <= 2^26
numbers), a materialised layer gradient <= 2^26 numbers. Targets live on the device: a factored target
holds, per anchor token, the output-grad and input of every Linear (bf16): about K * 2.5e6 numbers for
Llama-2-7B (sum over its Linears of in+out = 2.5e6), i.e. ~5 GB per target for the paper's 10 anchors of
~100 tokens (prompt + 10 response tokens; prompt tokens carry gradient too), plus LM-head factors for the
supervised tokens only and embedding rows by token id (small). A layer whose factors would outgrow its
dense matrix is stored dense (fp32). The bank's dense copies of factored layers (densify) stay within
1 GiB + the model's size; with the GPU's MEMORY_COST the cost model makes none for this model (factor
products are cheaper than materialising its Linears). Three targets (harmful + two safe) therefore need
~15 GB besides the model: a 40 GB GPU fits batch sizes of a few examples of 512 tokens; 80 GB is
comfortable.

On disk
-------
Target dir (stage "gradient_target"): `target.safetensors` with, per parameter p, some of
  p::dense [shape]                    dense part (fp32/fp64)
  p::fact.g [K, out], p::fact.x [K, in], p::fact.scale [K]   T_p += sum_k scale_k g_k x_k^T (model dtype)
  p::rows.ids [U], p::rows.val [U, d] T_p[ids] += val (embedding rows by token id)
and meta.json (base_meta + `target`: norm, renormalized, per-anchor norms and cosines, layout, bytes).
Score dir (stage "gradient_scores"): `scores.csv` (index,id,<target names>; file order; rows with a
non-finite or zero gradient left out and listed in meta.json `nonfinite`), `products.safetensors`
(inner [N, n_targets], sqnorm [N], fp64: the raw <G_i,T_j> and ||G_i||^2) and meta.json with `targets`.
Feature dir (`--proj_dim`, stage "gradient_features"): features.safetensors [N, proj_dim] like
representations (non-finite rows kept as NaN and listed in `nonfinite`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import data as D
from ..errors import MetadataMismatch, UserError
from ..models import default_device, load_model, load_tokenizer, resolve_dtype
from ..store import (META, atomic_write_text, distributed_rank, environment, load_tensors, now, parse_shard,
                     read_json, require_same, save_tensors, write_json)
from .runner import base_meta, check_existing_output, finish, prepare_data, run_chunked

log = logging.getLogger(__name__)

TARGET_FILE = "target.safetensors"
SCORES_FILE = "scores.csv"
PRODUCTS_FILE = "products.safetensors"
FEATURES_FILE = "features.safetensors"
PARAMS = ("all", "linear")
MODES = ("full", "lora")
LAYOUTS = ("auto", "factored", "dense")
PATHS = ("auto", "ghost", "materialise")
# Flags that define which gradient is computed: a target and a pool must agree on them.
GRADIENT_FLAGS = ("mode", "params", "lora")
TEMP_ELEMENTS = 1 << 26          # cap on one temporary product (numbers)
TARGET_FORMAT = "safedata.gradient_target"
TARGET_VERSION = "1"


# ----------------------------------------------------------------------------- numerics


_OUT_DTYPE_OK: dict = {}


def _out_dtype_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm/bmm(a, b, out_dtype=float32) runs here for low-precision a, b (CUDA)."""
    key = (str(device), dtype)
    if key not in _OUT_DTYPE_OK:
        try:
            a = torch.ones(2, 2, device=device, dtype=dtype)
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32 and \
                torch.bmm(a[None], a[None], out_dtype=torch.float32).dtype == torch.float32
        except Exception:  # noqa: BLE001 - any failure means: upcast instead
            ok = False
        _OUT_DTYPE_OK[key] = ok
    return _OUT_DTYPE_OK[key]


class Numerics:
    """Matmuls accumulated and returned in the compute dtype (fp32, or fp64 for fp64 models)."""

    def __init__(self, device: torch.device, model_dtype: torch.dtype):
        self.model_dtype = model_dtype
        self.cdt = torch.float64 if model_dtype == torch.float64 else torch.float32
        low = model_dtype in (torch.bfloat16, torch.float16)
        self.fast = low and device.type == "cuda" and _out_dtype_supported(device, model_dtype)

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """The dtype a tensor enters products in: the model's low precision where fp32-output matmuls exist."""
        if self.fast and t.dtype == self.model_dtype:
            return t
        return t if t.dtype == self.cdt else t.to(self.cdt)

    def _low(self, a, b):
        return self.fast and a.dtype == b.dtype and a.dtype != self.cdt

    def _give_up(self, err):
        log.warning("fp32-output low-precision matmul failed (%s); upcasting operands from now on", err)
        self.fast = False

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._low(a, b):
            try:
                return torch.mm(a, b, out_dtype=self.cdt)
            except RuntimeError as err:
                self._give_up(err)
        return torch.mm(a.to(self.cdt), b.to(self.cdt))

    def bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._low(a, b):
            try:
                return torch.bmm(a, b, out_dtype=self.cdt)
            except RuntimeError as err:
                self._give_up(err)
        return torch.bmm(a.to(self.cdt), b.to(self.cdt))


# ----------------------------------------------------------------------------- which parameters


@dataclass
class Site:
    """A module whose parameters' per-example gradients we assemble from its inputs and output-grads."""

    module_name: str
    module: nn.Module
    kind: str                   # "linear" | "embedding" | "norm"
    weight: str | None          # canonical parameter name of the weight
    bias: str | None = None
    head: bool = False          # the LM head: sees the supervised positions only
    lora: bool = False          # per-example gradient materialised (LoRA matrices: small; Adam needs it)


def unwrap(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_elementwise_norm(module: nn.Module) -> bool:
    own = dict(module.named_parameters(recurse=False))
    if not own or "weight" not in own or set(own) - {"weight", "bias"}:
        return False
    if isinstance(module, (nn.Linear, nn.Embedding)) or "norm" not in type(module).__name__.lower():
        return False
    if any(True for child in module.children() for _p in child.parameters()):
        return False
    return all(p.dim() == 1 and p.shape == own["weight"].shape for p in own.values())


def discover_sites(model, params="all", mode="full") -> list[Site]:
    """The modules to hook, in module order; refuses a model with parameters it cannot account for."""
    if mode == "full" and params not in PARAMS:
        raise UserError(f"--params {params!r}: choose from {', '.join(PARAMS)}")
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    base = unwrap(model)
    canonical = {id(p): n for n, p in model.named_parameters()}
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    sites: list[Site] = []

    def pname(module, attr):
        p = getattr(module, attr, None)
        return canonical[id(p)] if isinstance(p, nn.Parameter) else None

    if mode == "lora":
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (".lora_A." in name or ".lora_B." in name):
                sites.append(Site(name, module, "linear", pname(module, "weight"), pname(module, "bias"), lora=True))
        covered = {s.weight for s in sites} | {s.bias for s in sites if s.bias}
        lora_params = [n for n in canonical.values() if "lora_" in n]
        missing = [n for n in lora_params if n not in covered]
        if not sites or missing:
            raise UserError("--mode lora: only LoRA adapters on Linear layers are supported "
                            f"(uncovered LoRA parameters: {missing[:5]})" if missing else
                            "--mode lora: the model has no LoRA Linear layers (check --lora_target_modules)")
        return sites
    if head is not None and not isinstance(head, nn.Linear):
        raise UserError(f"{type(base).__name__}: the output embeddings are not an nn.Linear")
    for name, module in model.named_modules():
        if module is embed:
            if not isinstance(module, nn.Embedding):
                raise UserError(f"{type(base).__name__}: the input embeddings are not an nn.Embedding")
            if params == "all":
                sites.append(Site(name, module, "embedding", pname(module, "weight")))
        elif module is head:
            if params == "all":
                sites.append(Site(name, module, "linear", pname(module, "weight"), pname(module, "bias"), head=True))
        elif isinstance(module, nn.Linear):
            sites.append(Site(name, module, "linear", pname(module, "weight"), pname(module, "bias")))
        elif params == "all" and _is_elementwise_norm(module):
            sites.append(Site(name, module, "norm", pname(module, "weight"), pname(module, "bias")))
    if params == "all":
        covered = {s.weight for s in sites} | {s.bias for s in sites if s.bias}
        missing = [n for n in canonical.values() if n not in covered]
        if missing:
            raise UserError(f"{type(base).__name__}: cannot compute per-example gradients of {len(missing)} "
                            f"parameter(s) ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}); "
                            "supported: Linear, Embedding, elementwise norms (Llama, Mistral, Qwen2); "
                            "use --params linear")
    return sites


def param_shapes(model, sites: list[Site]) -> dict[str, tuple]:
    params = dict(model.named_parameters())
    out = {}
    for s in sites:
        for name in (s.weight, s.bias):
            if name:
                out[name] = tuple(params[name].shape)
    return out


# ----------------------------------------------------------------------------- Adam preconditioning


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


# ----------------------------------------------------------------------------- the engine


class _Input:
    """A Linear input shared by the sites that read it (q/k/v; gate/up): masked once, Gram once."""

    __slots__ = ("raw", "users", "x", "xo", "gram")

    def __init__(self, raw):
        self.raw, self.users, self.x, self.xo, self.gram = raw, 0, None, None, None


class GradientEngine:
    """Installs the hooks for one batch, runs forward + backward, and feeds an accumulator."""

    def __init__(self, model, params="all", mode="full", adam: AdamState | None = None, path="auto"):
        self.model = model
        self.base = unwrap(model)
        self.decoder = self.base.get_decoder() if hasattr(self.base, "get_decoder") else None
        self.embed = self.base.get_input_embeddings()
        self.head = self.base.get_output_embeddings()
        if self.decoder is None or self.head is None or self.embed is None:
            raise UserError(f"{type(self.base).__name__}: need a causal LM with a decoder, input embeddings and an LM head")
        config = getattr(self.base, "config", None)
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(config, attr, None) not in (None, 1, 1.0):
                raise UserError(f"{type(self.base).__name__}: {attr} is not supported (Llama, Mistral, Qwen2 are)")
        for p in model.parameters():
            p.requires_grad_(False)
        self.params, self.mode = params, mode
        self.sites = discover_sites(model, params, mode)
        self.shapes = param_shapes(model, self.sites)
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.num = Numerics(self.device, self.dtype)
        self.cdt = self.num.cdt
        self.vocab = self.embed.weight.shape[0]
        self.adam = adam.to(self.device, self.cdt) if adam is not None else None
        if path not in PATHS:
            raise ValueError(f"path {path!r}: choose from {PATHS}")
        self.path = path
        heads = [s for s in self.sites if s.head]
        embeds = [s for s in self.sites if s.kind == "embedding"]
        self.tied = heads[0].weight if heads and embeds and heads[0].weight == embeds[0].weight else None
        self.beta = memory_cost(self.device)
        self._buffer = None

    # -------------------------------------------------------------- batch

    def run(self, items: list[D.Encoded], pad_id: int, acc) -> None:
        batch = D.collate(items, pad_id)
        ids = batch["input_ids"].to(self.device)
        attn = batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device)
        B, T = ids.shape
        sup = labels[:, 1:] != D.IGNORE_INDEX                      # position t predicts token t + 1
        counts = sup.sum(1)
        if bool((counts == 0).any()):
            raise ValueError("an item without a supervised token reached the gradient engine")
        S = int(counts.max())
        steps = torch.arange(T - 1, device=self.device).expand(B, -1)
        pos = torch.where(sup, steps, steps + T).argsort(dim=1)[:, :S]
        hmask = torch.arange(S, device=self.device)[None, :] < counts[:, None]
        pos = torch.where(hmask, pos, torch.zeros_like(pos))
        target_ids = labels[:, 1:].gather(1, pos)
        self._mask, self._hmask, self._ids = attn.bool(), hmask, ids
        self._inputs: dict[int, _Input] = {}
        self._leaf = None
        acc.begin(self, B, ids)
        handles = [self.embed.register_forward_hook(self._embedding_forward)]
        try:
            for site in self.sites:
                if site.kind == "linear":
                    handles.append(site.module.register_forward_hook(self._make_linear_forward(site)))
                elif site.kind == "norm":
                    handles.append(site.module.register_forward_hook(self._make_norm_forward(site)))
            with torch.enable_grad():
                out = self.decoder(input_ids=ids, attention_mask=attn, use_cache=False)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                hs = hidden.gather(1, pos[..., None].expand(B, S, hidden.shape[-1]))
                logits = self.head(hs)
                rows = torch.arange(B, device=self.device)[:, None].expand(B, S)[hmask]
                ce = F.cross_entropy(logits[hmask].to(self.cdt), target_ids[hmask], reduction="none")
                loss = (ce / counts.to(self.cdt)[rows]).sum()     # sum over examples of each one's token mean
                del out, hidden, hs, logits, ce
                if self._leaf is None:
                    raise UserError("the input embeddings' forward hook did not run (unsupported model)")
                torch.autograd.grad(loss, self._leaf)
        finally:
            for h in handles:
                h.remove()
            self._inputs = {}
            self._leaf = None
        acc.end()

    # -------------------------------------------------------------- hooks

    def _embedding_forward(self, module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        self._leaf = leaf
        site = next((s for s in self.sites if s.kind == "embedding"), None)
        if site is not None:
            token_ids = inputs[0] if inputs else self._ids
            leaf.register_hook(lambda g: self._embedding_backward(site, token_ids, g))
        return leaf

    def _embedding_backward(self, site, token_ids, g):
        mask = self._mask
        padding_idx = getattr(site.module, "padding_idx", None)
        if padding_idx is not None and bool((token_ids == padding_idx).any()):
            # nn.Embedding(padding_idx=p) never updates row p: autograd's gradient of that row is zero
            mask = mask & (token_ids != padding_idx)
            g = torch.where(mask[..., None], g, torch.zeros((), dtype=g.dtype, device=g.device))
        self._acc.embedding(site, token_ids, g, mask)

    def _make_linear_forward(self, site):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            x = inputs[0]
            entry = self._inputs.get(id(x))
            if entry is None:
                entry = self._inputs[id(x)] = _Input(x)
            entry.users += 1
            holder = [entry]
            output.register_hook(lambda g: self._linear_backward(site, holder, g))
            return None
        return hook

    def _linear_backward(self, site, holder, g):
        # No masking copies: padding is on the right of a causal LM, so no supervised position attends to a
        # padded one and g is exactly zero there (and at the head's unsupervised slots, which are not in the
        # loss); the inputs at padded positions are finite (they attend to their example's own tokens), so
        # every product g_t x_t^T, Gram entry and factor product of a padded position is exactly zero.
        entry = holder.pop()
        mask = self._hmask if site.head else self._mask
        if entry.x is None:
            entry.x = entry.raw
        if site.bias:
            self._acc.dense(site.bias, g.to(self.cdt).sum(1))
        if site.lora:
            grads = self.num.bmm(g.transpose(1, 2), entry.x)        # [B, out, in]: small (LoRA)
            if self.adam is not None:
                grads = self.adam.apply(site.weight, grads)
            self._acc.dense(site.weight, grads.reshape(grads.shape[0], -1))
        else:
            self._acc.linear(site, entry, g, mask)
        entry.users -= 1
        if entry.users == 0:
            self._inputs.pop(id(entry.raw), None)
            entry.raw = entry.x = entry.xo = entry.gram = None

    def _make_norm_forward(self, site):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            holder = [inputs[0]]
            output.register_hook(lambda g: self._norm_backward(site, holder, g))
            return None
        return hook

    def _norm_backward(self, site, holder, g):
        x = holder.pop()
        module = site.module
        w = dict(module.named_parameters(recurse=False))
        with torch.no_grad():
            one = {n: (torch.ones_like(p) if n == "weight" else torch.zeros_like(p)) for n, p in w.items()}
            zero = {n: torch.zeros_like(p) for n, p in w.items()}
            normed = torch.func.functional_call(module, one, (x,)) - torch.func.functional_call(module, zero, (x,))
        gc = g.to(self.cdt)                       # zero at padded positions (see _linear_backward)
        self._acc.dense(site.weight, (gc * normed.to(self.cdt)).sum(1))
        if site.bias:
            self._acc.dense(site.bias, gc.sum(1))

    # -------------------------------------------------------------- helpers for accumulators

    def input_x(self, entry: _Input) -> torch.Tensor:
        if entry.xo is None:
            entry.xo = self.num.operand(entry.x)
        return entry.xo

    def per_example_grads(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[b, out, in] = g^T x per example, in the compute dtype; off CUDA written into one reused buffer
        (a fresh allocation of this size costs page faults on every layer)."""
        if self.num.fast or self.device.type == "cuda":
            return self.num.bmm(g.transpose(1, 2), x)
        b, m, n = g.shape[0], g.shape[-1], x.shape[-1]
        size = b * m * n
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = torch.empty(max(size, min(TEMP_ELEMENTS, 4 * size)), dtype=self.cdt, device=self.device)
        out = self._buffer[:size].view(b, m, n)
        return torch.bmm(g.transpose(1, 2).to(self.cdt), x.to(self.cdt), out=out)

    def input_gram(self, entry: _Input) -> torch.Tensor:
        if entry.gram is None:
            x = self.input_x(entry)
            entry.gram = self.num.bmm(x, x.transpose(1, 2))
        return entry.gram

    def use(self, acc):
        self._acc = acc
        return self


# ----------------------------------------------------------------------------- targets


@dataclass
class ParamTarget:
    """One parameter's part of a target: a sum of a dense part, scaled factors and embedding rows."""

    shape: tuple
    dense: torch.Tensor | None = None
    fact_g: torch.Tensor | None = None      # [K, out]
    fact_x: torch.Tensor | None = None      # [K, in]
    fact_scale: torch.Tensor | None = None  # [K]
    rows_ids: torch.Tensor | None = None    # [U]
    rows_val: torch.Tensor | None = None    # [U, d]

    @property
    def form(self) -> str:
        parts = [k for k, v in (("dense", self.dense), ("factored", self.fact_g), ("rows", self.rows_ids))
                 if v is not None]
        return "+".join(parts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.dense, self.fact_g, self.fact_x, self.fact_scale,
                                                          self.rows_ids, self.rows_val) if t is not None)

    def scale_(self, s: float) -> None:
        if self.dense is not None:
            self.dense = self.dense * s
        if self.fact_scale is not None:
            self.fact_scale = self.fact_scale * s
        if self.rows_val is not None:
            self.rows_val = self.rows_val * s

    def to_dense(self, dtype, device=None) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=dtype, device=device)
        if self.dense is not None:
            out += self.dense.to(device=device, dtype=dtype)
        if self.fact_g is not None:
            g = self.fact_g.to(device=device, dtype=dtype) * self.fact_scale.to(device=device, dtype=dtype)[:, None]
            out += g.T @ self.fact_x.to(device=device, dtype=dtype)
        if self.rows_ids is not None:
            out.index_add_(0, self.rows_ids.to(device), self.rows_val.to(device=device, dtype=dtype))
        return out


@dataclass
class Target:
    """T = (1/N) sum_a G_a/||G_a|| (times 1/||T|| when renormalised), per parameter."""

    params: dict[str, ParamTarget]
    mode: str = "full"
    param_set: str = "all"
    norm: float | None = None
    renormalized: bool = False
    anchor_sqnorm: list[float] = field(default_factory=list)
    anchor_inner: list[float] = field(default_factory=list)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params.items():
            for key in ("dense", "fact_g", "fact_x", "fact_scale", "rows_ids", "rows_val"):
                value = getattr(p, key)
                if value is not None:
                    out[f"{name}::{key.replace('_', '.', 1)}"] = value
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layout: dict, **kw) -> "Target":
        params = {name: ParamTarget(tuple(spec["shape"])) for name, spec in layout.items()}
        for key, value in tensors.items():
            name, _, part = key.rpartition("::")
            if name not in params:
                raise UserError(f"target tensor {key!r} is not in the layout of meta.json")
            setattr(params[name], part.replace(".", "_"), value)
        return cls(params, **kw)

    def layout(self) -> dict:
        return {name: {"shape": list(p.shape), "form": p.form,
                       "tokens": int(p.fact_g.shape[0]) if p.fact_g is not None else 0,
                       "rows": int(p.rows_ids.shape[0]) if p.rows_ids is not None else 0,
                       "bytes": p.nbytes()} for name, p in self.params.items()}


class _ParamBank:
    """One parameter's part of all targets, in the forms the hooks use.

    dense_mat [Jd, numel]: the targets stored dense (dense_cols: their target index), one GEMM for all of them;
    G, X, W: the factored targets concatenated (W [K, J] = scale x one-hot(target));
    full_mat [Jf, numel] (full_cols): optional, every dense or factored target of the layer as a dense matrix
    (dense_mat is its first Jd rows), made where materialising the layer's per-example gradient and one GEMM
    against it is cheaper than factor products (see TargetBank.densify);
    rows: embedding rows by token id.
    """

    __slots__ = ("G", "X", "W", "dense_mat", "dense_cols", "full_mat", "full_cols", "rows", "_dense")

    def __init__(self):
        self.G = self.X = self.W = None
        self.dense_mat = self.dense_cols = self.full_mat = self.full_cols = None
        self._dense: list[tuple[int, torch.Tensor]] = []
        self.rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (j, lookup[V], ids, val)

    @property
    def K(self):
        return 0 if self.G is None else self.G.shape[0]

    @property
    def Jd(self):
        return 0 if self.dense_mat is None else self.dense_mat.shape[0]

    @property
    def dense(self) -> list[tuple[int, torch.Tensor]]:
        """(target index, dense part [numel]) per densely stored target."""
        if self.dense_mat is None:
            return []
        return list(zip(self.dense_cols.tolist(), self.dense_mat.unbind(0)))


# Memory traffic in multiply-add equivalents per number read or written (the device's compute/bandwidth
# ratio, measured on the development CPU; from the datasheet for H100/H200 class GPUs): the cost model
# below weighs a materialised per-example gradient's passes over memory against the products it saves.
MEMORY_COST = {"cpu": 16.0, "cuda": 256.0}
DENSIFY_T = 128                  # the batch length a layer's form is chosen for
DENSIFY_BYTES = 1 << 30          # extra memory for densified targets, besides the model's own size


def memory_cost(device: torch.device) -> float:
    return MEMORY_COST.get(device.type, 64.0)


def linear_costs(T: int, n: int, m: int, K: int, Jd: int, full: bool, beta: float) -> dict:
    """Per-example cost (multiply-adds) of each way to get ||G||^2 and <G, T_j> for a Linear [m, n]."""
    nm = n * m
    costs = {"ghost": T * T * (n + m) + K * T * (n + m) + Jd * T * nm,
             "materialise": T * nm + beta * nm * (2 + (Jd > 0))
             + (min(K * nm + beta * nm, K * T * (n + m)) if K else 0)}
    if full:
        costs["full"] = T * nm + 3 * beta * nm
    return costs


class TargetBank:
    """Targets on the device, arranged per parameter for the hooks (all targets of a layer together)."""

    def __init__(self, targets: list[Target], engine: GradientEngine, densify: bool = True):
        self.n = len(targets)
        self.engine = engine
        self.params: dict[str, _ParamBank] = {}
        dev, cdt, num = engine.device, engine.cdt, engine.num
        facts: dict[str, list] = {}
        for j, target in enumerate(targets):
            if target.mode != engine.mode or target.param_set != engine.params:
                raise MetadataMismatch(f"target {j} was made with --mode {target.mode} --params {target.param_set}; "
                                       f"this run has --mode {engine.mode} --params {engine.params}")
            if set(target.params) != set(engine.shapes):
                extra = sorted(set(target.params) ^ set(engine.shapes))
                raise MetadataMismatch(f"target {j} covers other parameters than this model/run ({extra[:4]})")
            for name, p in target.params.items():
                if tuple(p.shape) != tuple(engine.shapes[name]):
                    raise MetadataMismatch(f"target {j}: parameter {name} has shape {p.shape}, "
                                           f"the model's is {engine.shapes[name]}")
                bank = self.params.setdefault(name, _ParamBank())
                if p.dense is not None:
                    bank._dense.append((j, p.dense.to(device=dev, dtype=cdt).reshape(-1)))
                if p.rows_ids is not None:
                    lookup = torch.full((p.shape[0],), -1, dtype=torch.long, device=dev)
                    ids = p.rows_ids.to(dev, torch.long)
                    lookup[ids] = torch.arange(ids.numel(), device=dev)
                    bank.rows.append((j, lookup, ids, p.rows_val.to(device=dev, dtype=cdt)))
                if p.fact_g is not None:
                    facts.setdefault(name, []).append((j, p))
        for name, ps in facts.items():
            bank = self.params[name]
            bank.G = torch.cat([num.operand(p.fact_g.to(dev)) for _, p in ps])
            bank.X = torch.cat([num.operand(p.fact_x.to(dev)) for _, p in ps])
            W = []
            for j, p in ps:
                w = torch.zeros(p.fact_g.shape[0], self.n, dtype=cdt, device=dev)
                w[:, j] = p.fact_scale.to(device=dev, dtype=cdt)
                W.append(w)
            bank.W = torch.cat(W)
        for name, bank in self.params.items():
            if bank._dense:
                bank.dense_cols = torch.tensor([j for j, _ in bank._dense], dtype=torch.long, device=dev)
                bank.dense_mat = torch.stack([d for _, d in bank._dense])
            bank._dense = []
        self.densified: list[str] = []
        if densify:
            self.densify(facts)

    def densify(self, facts: dict) -> None:
        """Add a dense copy of the factored targets of the Linear layers where (at a typical batch length)
        materialising the per-example gradient and one GEMM against every target beats factor products,
        greedily by the saving per byte, within DENSIFY_BYTES plus the model's own size."""
        e = self.engine
        linear = {s.weight for s in e.sites if s.kind == "linear" and not s.lora}
        beta = memory_cost(e.device)
        budget = DENSIFY_BYTES + sum(p.numel() * p.element_size() for p in e.model.parameters())
        size = torch.tensor([], dtype=e.cdt).element_size()
        candidates = []
        for name, ps in facts.items():
            bank = self.params[name]
            if name not in linear or len(e.shapes[name]) != 2:
                continue
            m, n = e.shapes[name]
            now = linear_costs(DENSIFY_T, n, m, bank.K, bank.Jd, False, beta)
            after = linear_costs(DENSIFY_T, n, m, bank.K, bank.Jd, True, beta)["full"]
            saving = min(now.values()) - after
            nbytes = len({j for j, _ in ps}) * n * m * size
            if saving > 0:
                candidates.append((saving / nbytes, name, nbytes))
        for _, name, nbytes in sorted(candidates, reverse=True):
            if nbytes > budget:
                continue
            budget -= nbytes
            bank = self.params[name]
            cols = sorted({j for j, _ in facts[name]})
            G, X, W = bank.G.to(e.cdt), bank.X.to(e.cdt), bank.W
            extra = torch.stack([((G * W[:, j:j + 1]).T @ X).reshape(-1) for j in cols])
            if bank.dense_mat is not None:
                extra = torch.cat([bank.dense_mat, extra])
                cols = bank.dense_cols.tolist() + cols
            bank.full_mat = extra
            bank.full_cols = torch.tensor(cols, dtype=torch.long, device=e.device)
            if bank.dense_mat is not None:
                bank.dense_mat = bank.full_mat[:bank.Jd]
            self.densified.append(name)

    def get(self, name) -> _ParamBank | None:
        return self.params.get(name)

    def nbytes(self) -> int:
        seen, total = set(), 0
        for bank in self.params.values():
            tensors = [bank.G, bank.X, bank.W, bank.full_mat if bank.full_mat is not None else bank.dense_mat]
            tensors += [t for r in bank.rows for t in r[1:]]
            for t in tensors:
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total


# ----------------------------------------------------------------------------- accumulators


def _chunks(total: int, per_item: int):
    step = max(1, TEMP_ELEMENTS // max(1, per_item))
    return [(s, min(total, s + step)) for s in range(0, total, step)]


class ScoreAccumulator:
    """Per batch: sqnorm [B] = ||G_i||^2 and inner [B, J] = <G_i, T_j>, layer by layer in the hooks."""

    def __init__(self, bank: TargetBank | None = None):
        self.bank = bank
        self.n_targets = bank.n if bank is not None else 0

    def begin(self, engine, B, ids):
        self.e, self.num, self.cdt = engine, engine.num, engine.cdt
        self.B, self.ids = B, ids
        self.sq = torch.zeros(B, dtype=self.cdt, device=engine.device)
        self.inner = torch.zeros(B, self.n_targets, dtype=self.cdt, device=engine.device)
        self._stash = None
        engine.use(self)

    def end(self):
        self._stash = None

    def _param(self, name):
        return self.bank.get(name) if self.bank is not None else None

    # -------------------------------------------------------------- dense (norms, biases, LoRA)

    def dense(self, name, v):
        v = v.to(self.cdt)
        self.sq += (v * v).sum(1)
        pb = self._param(name)
        if pb is not None and pb.Jd:
            self.inner[:, pb.dense_cols] += v @ pb.dense_mat.T
        self.after_dense(name, v)

    def after_dense(self, name, v):
        pass

    # -------------------------------------------------------------- linear

    def linear(self, site, entry, g, mask):
        num, e = self.num, self.e
        x = e.input_x(entry)
        g_orig, g = g, num.operand(g)
        B, T, n = x.shape
        m = g.shape[-1]
        pb = self._param(site.weight)
        K = pb.K if pb is not None else 0
        Jd = pb.Jd if pb is not None else 0
        full = pb is not None and pb.full_mat is not None
        if e.path == "ghost":
            way = "ghost"
        elif e.path == "materialise":
            way = "full" if full else "materialise"
        else:
            costs = linear_costs(T, n, m, K, Jd, full, e.beta)
            way = min(costs, key=costs.get)
        if way != "ghost":
            self._linear_materialised(x, g, pb, T, way == "full")
        else:
            gg = num.bmm(g, g.transpose(1, 2))
            self.sq += (gg * e.input_gram(entry)).sum((1, 2))
            del gg
            if pb is not None:
                if K:
                    self.inner += self._factored_by_activations(x, g, pb)
                for j, D_ in pb.dense:
                    self.inner[:, j] += self._dense_by_activations(x, g, D_.view(m, n))
        if pb is not None:
            for j, lookup, ids, val in pb.rows:        # a tied LM head against the embedding rows of a target
                hr = num.mm(x.reshape(B * T, n), val.T).view(B, T, -1)
                self.inner[:, j] += (hr * g[:, :, ids].to(self.cdt)).sum((1, 2))
        if site.head and e.tied == site.weight:
            # keep what the embedding's hook needs for the cross term 2<E_i, H_i>
            tok = self.ids[:, None, :].expand(B, T, self.ids.shape[1])
            self._stash = (x, g.gather(2, tok))
        self.after_linear(site, entry, g_orig, mask)

    def after_linear(self, site, entry, g, mask):
        pass

    def _factored_by_activations(self, x, g, pb):
        num = self.num
        B, T, n = x.shape
        m = g.shape[-1]
        out = torch.zeros(B, self.n_targets, dtype=self.cdt, device=x.device)
        g2, x2 = g.reshape(B * T, m), x.reshape(B * T, n)
        for k0, k1 in _chunks(pb.K, 2 * B * T):
            P = num.mm(g2, pb.G[k0:k1].T).view(B, T, -1)
            Q = num.mm(x2, pb.X[k0:k1].T).view(B, T, -1)
            out += (P * Q).sum(1) @ pb.W[k0:k1]
        return out

    def _dense_by_activations(self, x, g, D_):
        num = self.num
        B, T, n = x.shape
        m = g.shape[-1]
        out = torch.zeros(B * T, dtype=self.cdt, device=x.device)
        x2, g2 = x.reshape(B * T, n), g.reshape(B * T, m)
        for r0, r1 in _chunks(B * T, m):
            y = num.mm(x2[r0:r1], D_.T)
            out[r0:r1] = (y * g2[r0:r1].to(self.cdt)).sum(1)
        return out.view(B, T).sum(1)

    def _linear_materialised(self, x, g, pb, T, full=False):
        """Each example's gradient of the layer, one chunk of examples at a time (in a reused buffer):
        ||G_i||^2 from it, <G_i, T_j> by one GEMM against the dense targets (all of them with `full`)."""
        num, e = self.num, self.e
        B, _, n = x.shape
        m = g.shape[-1]
        K = pb.K if pb is not None and not full else 0
        mat, cols = (None, None) if pb is None else \
            (pb.full_mat, pb.full_cols) if full else (pb.dense_mat, pb.dense_cols)
        via_grad = K and K * n * m < K * T * (n + m)
        for b0, b1 in _chunks(B, m * n):
            grads = e.per_example_grads(g[b0:b1], x[b0:b1])          # [b, out, in]
            flat = grads.view(b1 - b0, -1)
            self.sq[b0:b1] += torch.linalg.vector_norm(flat, dim=1).square()
            if mat is not None:
                self.inner[b0:b1, cols] += flat @ mat.T
            if K and via_grad:
                Xc, Gc = pb.X.to(self.cdt), pb.G.to(self.cdt)
                for k0, k1 in _chunks(K, (b1 - b0) * m):
                    gx = grads @ Xc[k0:k1].T                            # [b, out, k]
                    self.inner[b0:b1] += (gx * Gc[k0:k1].T[None]).sum(1) @ pb.W[k0:k1]
            elif K:
                self.inner[b0:b1] += self._factored_by_activations(x[b0:b1], g[b0:b1], pb)
            del grads, flat

    # -------------------------------------------------------------- embedding

    def embedding(self, site, token_ids, g, mask):
        """Rows of the per-example gradient by (example, token id), summed exactly."""
        num, cdt = self.num, self.cdt
        B, T, d = g.shape
        V = self.e.vocab
        sel = mask
        owner = torch.arange(B, device=g.device)[:, None].expand(B, T)[sel]
        tok = token_ids[sel]
        key = owner * V + tok
        uniq, inv = torch.unique(key, return_inverse=True)
        rows = torch.zeros(uniq.numel(), d, dtype=cdt, device=g.device).index_add_(0, inv, g[sel].to(cdt))
        ub, uid = uniq // V, uniq % V
        self.sq.index_add_(0, ub, (rows * rows).sum(1))
        pb = self._param(site.weight)
        if pb is not None:
            for j, lookup, ids, val in pb.rows:
                li = lookup[uid]
                ok = li >= 0
                col = torch.zeros(B, dtype=cdt, device=g.device)
                col.index_add_(0, ub[ok], (rows[ok] * val[li[ok]]).sum(1))
                self.inner[:, j] += col
            for j, D_ in pb.dense:
                col = torch.zeros(B, dtype=cdt, device=g.device)
                col.index_add_(0, ub, (rows * D_.view(V, d)[uid]).sum(1))
                self.inner[:, j] += col
            if pb.K:                                    # tied: the LM-head factors of the target, at these rows
                part = torch.zeros(B, self.n_targets, dtype=cdt, device=g.device)
                for k0, k1 in _chunks(pb.K, rows.shape[0]):
                    a = num.mm(num.operand(rows), pb.X[k0:k1].T)          # [U, k]
                    sel_g = pb.G[k0:k1][:, uid].T.to(cdt)                  # [U, k]
                    part.index_add_(0, ub, (a * sel_g) @ pb.W[k0:k1])
                self.inner += part
        if self._stash is not None:                     # tied: 2 <E_i, H_i>
            hx, z = self._stash
            a = num.bmm(num.operand(g), hx.transpose(1, 2))              # [B, T, S]: g_t . h_s
            self.sq += 2 * (a * z.transpose(1, 2).to(cdt)).sum((1, 2))
            self._stash = None
        self.after_embedding(site, rows, ub, uid)

    def after_embedding(self, site, rows, ub, uid):
        pass


class CaptureAccumulator(ScoreAccumulator):
    """Anchor pass: the norms, plus each anchor's factors / rows / dense parts for building the target."""

    def __init__(self):
        super().__init__(None)
        self.pieces: dict[str, dict[str, list]] = {}
        self.owners = None

    def _piece(self, name):
        return self.pieces.setdefault(name, {"fact": [], "rows": [], "dense": []})

    def after_dense(self, name, v):
        self._piece(name)["dense"].append((self.owners.cpu(), v.detach().cpu()))

    def after_linear(self, site, entry, g, mask):
        keep = mask & (g != 0).any(-1)
        owner = self.owners.to(g.device)[:, None].expand(keep.shape)[keep]
        self._piece(site.weight)["fact"].append((g[keep].cpu(), entry.x[keep].cpu(), owner.cpu()))

    def after_embedding(self, site, rows, ub, uid):
        self._piece(site.weight)["rows"].append((self.owners.to(ub.device)[ub].cpu(), uid.cpu(), rows.cpu()))

    def build(self, coef: torch.Tensor, shapes: dict, cdt, device, layout="auto", model_dtype=None) -> dict:
        """coef[a] = 1/(N ||G_a||): the target's parts, each stored in its smallest exact form."""
        out = {}
        coef = coef.to(cdt)
        for name, shape in shapes.items():
            pieces = self.pieces.get(name, {"fact": [], "rows": [], "dense": []})
            p = ParamTarget(tuple(shape))
            if pieces["dense"]:
                total = torch.zeros(int(torch.tensor(shape).prod()), dtype=cdt)
                for owners, v in pieces["dense"]:
                    total += (coef[owners][:, None] * v.to(cdt)).sum(0)
                p.dense = total.view(shape)
            if pieces["fact"]:
                p.fact_g = torch.cat([f[0] for f in pieces["fact"]])
                p.fact_x = torch.cat([f[1] for f in pieces["fact"]])
                p.fact_scale = coef[torch.cat([f[2] for f in pieces["fact"]])]
            if pieces["rows"]:
                owners = torch.cat([r[0] for r in pieces["rows"]])
                uid = torch.cat([r[1] for r in pieces["rows"]])
                vals = torch.cat([r[2] for r in pieces["rows"]]).to(cdt) * coef[owners][:, None]
                ids, inv = torch.unique(uid, return_inverse=True)
                p.rows_ids = ids
                p.rows_val = torch.zeros(ids.numel(), shape[1], dtype=cdt).index_add_(0, inv, vals)
            if p.dense is None and p.fact_g is None and p.rows_ids is None:
                p.dense = torch.zeros(shape, dtype=cdt)
            numel = int(torch.tensor(shape).prod())
            dense_bytes = numel * torch.tensor([], dtype=cdt).element_size()
            want_dense = layout == "dense" or (layout == "auto" and p.nbytes() >= dense_bytes)
            if p.form != "dense" and (want_dense or p.dense is not None):
                p = ParamTarget(tuple(shape), dense=p.to_dense(cdt, device).cpu())
            out[name] = p
        return out


class ProjectAccumulator:
    """Per batch: the per-example gradients' random projection [B, proj_dim] (projection.py)."""

    def __init__(self, projector):
        self.projector = projector

    def begin(self, engine, B, ids):
        self.e, self.parts = engine, {}
        engine.use(self)

    def end(self):
        pass

    def _add(self, name, value):
        self.parts[name] = value if name not in self.parts else self.parts[name] + value

    def dense(self, name, v):
        self._add(name, self.projector.project_dense(name, v))

    def linear(self, site, entry, g, mask):
        self._add(site.weight, self.projector.project_linear(site.weight, g, entry.x))

    def embedding(self, site, token_ids, g, mask):
        self._add(site.weight, self.projector.project_embedding(site.weight, g, token_ids))

    def result(self) -> torch.Tensor:
        return self.projector.project(self.parts)


# ----------------------------------------------------------------------------- functions the benchmark calls


def get_engine(model, params="all", mode="full", adam: AdamState | None = None, path="auto") -> GradientEngine:
    """The model's engine for these settings (cached on the model object)."""
    cache = model.__dict__.get("_safedata_gradient_engines")
    if cache is None:
        cache = {}
        object.__setattr__(model, "_safedata_gradient_engines", cache)
    key = (params, mode, id(adam), path)
    if key not in cache:
        cache[key] = GradientEngine(model, params, mode, adam, path)
    return cache[key]


def score_batch(model, items: list[D.Encoded], targets, pad_id: int, params=None, mode=None,
                adam: AdamState | None = None, path="auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(inner [B, n_targets], sqnorm [B]) = (<G_i, T_j>, ||G_i||^2), from one forward + backward.

    targets: a TargetBank (made once: `TargetBank(targets, get_engine(model, ...))`; it carries the engine and
    its settings), a list of Target (moved to the device at each call), or None (norms only).
    params/mode default to the targets'.
    """
    if isinstance(targets, Target):
        targets = [targets]
    if isinstance(targets, TargetBank):
        engine, bank = targets.engine, targets
        if engine.model is not model or (params or engine.params) != engine.params or \
                (mode or engine.mode) != engine.mode:
            raise ValueError("score_batch: the TargetBank was made for another model or settings")
    else:
        first = targets[0] if targets else None
        params = params or (first.param_set if first else "all")
        mode = mode or (first.mode if first else "full")
        engine = get_engine(model, params, mode, adam, path)
        bank = TargetBank(targets, engine) if targets else None
    acc = ScoreAccumulator(bank)
    engine.run(items, pad_id, acc)
    return acc.inner, acc.sq


def bank_for(model, targets: list[Target], adam: AdamState | None = None, path="auto") -> TargetBank:
    """Targets moved to the model's device once, for repeated score_batch calls (what a benchmark wants)."""
    return TargetBank(targets, get_engine(model, targets[0].param_set, targets[0].mode, adam, path))


def project_batch(model, items, projector, pad_id: int, params="all", mode="full", adam=None) -> torch.Tensor:
    """[B, proj_dim] projected per-example gradients."""
    engine = get_engine(model, params, mode, adam)
    acc = ProjectAccumulator(projector)
    engine.run(items, pad_id, acc)
    return acc.result()


def projector_for(engine: GradientEngine, proj_dim: int, seed: int = 0):
    from .projection import FactoredProjector
    shapes = {n: (s if len(s) == 2 else (1, s[0])) for n, s in engine.shapes.items()}
    return FactoredProjector(shapes, proj_dim, seed=seed, device=engine.device, dtype=engine.cdt)


@dataclass
class AnchorResult:
    target: Target
    sqnorm: torch.Tensor      # [N] ||G_a||^2
    inner: torch.Tensor       # [N] <G_a, T> (before renormalisation)


def anchor_gradients(model, items: list[D.Encoded], pad_id: int, params="all", mode="full", batch_size=8,
                     adam: AdamState | None = None, renormalize=False, layout="auto", path="auto",
                     progress=False) -> AnchorResult:
    """The target T = mean_a G_a/||G_a|| of the anchors (exact, compact), its norm, per-anchor cosines."""
    if layout not in LAYOUTS:
        raise UserError(f"target layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    engine = get_engine(model, params, mode, adam, path)
    n = len(items)
    acc = CaptureAccumulator()
    sq = torch.zeros(n, dtype=torch.float64)
    batches = D.length_bucketed_batches([len(it) for it in items], batch_size)
    from tqdm import tqdm
    for positions in tqdm(batches, desc="anchors", unit="batch", disable=not progress):
        acc.owners = torch.tensor(positions, dtype=torch.long)
        engine.run([items[p] for p in positions], pad_id, acc)
        sq[positions] = acc.sq.detach().double().cpu()
    bad = [items[i].id for i in range(n) if not math.isfinite(sq[i]) or sq[i] <= 0]
    if bad:
        raise UserError(f"anchor(s) with a non-finite or zero gradient: ids {', '.join(bad[:10])}")
    coef = 1.0 / (sq.sqrt() * n)
    parts = acc.build(coef, engine.shapes, engine.cdt, engine.device, layout, engine.dtype)
    del acc
    target = Target(parts, mode, params)
    # ||T||^2 = sum_a coef_a <G_a, T>: one more pass over the anchors against the finished target.
    bank = TargetBank([target], engine)
    inner = torch.zeros(n, dtype=torch.float64)
    for positions in batches:
        scorer = ScoreAccumulator(bank)
        engine.run([items[p] for p in positions], pad_id, scorer)
        inner[positions] = scorer.inner[:, 0].detach().double().cpu()
    del bank
    norm = float((coef * inner).sum().clamp_min(0).sqrt())
    target.norm = norm
    target.anchor_sqnorm, target.anchor_inner = sq.tolist(), inner.tolist()
    if renormalize:
        if norm <= 0:
            raise UserError("--renormalize: the target is zero")
        for p in target.params.values():
            p.scale_(1.0 / norm)
        target.renormalized = True
    return AnchorResult(target, sq, inner)


# ----------------------------------------------------------------------------- model setup for the CLI


def init_distributed() -> bool:
    """torchrun: one process group (nccl on GPU, gloo on CPU); True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist
    if dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


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
            digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()[:16]


def apply_lora(model, settings: dict, lora_path=None):
    """Wrap with peft: the adapter from lora_path, or a fresh one (seeded; random A, zero B)."""
    from peft import LoraConfig, PeftModel, get_peft_model
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


def _setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state, model=None, tokenizer=None):
    if model is None:
        model, tokenizer = load_model(model_name, dtype, device)
    if mode == "lora":
        model = apply_lora(model, lora, lora_path)
    elif lora_path or optimizer_state:
        raise UserError("--lora_path / --optimizer_state need --mode lora")
    adam = load_adam_state(optimizer_state, model) if optimizer_state else None
    return model, tokenizer, adam


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


# ----------------------------------------------------------------------------- stages


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
    model, tokenizer, adam = _setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state,
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


def load_target(directory) -> tuple[Target, dict]:
    directory = Path(directory)
    meta = read_json(directory / META)
    if meta.get("stage") != "gradient_target":
        raise UserError(f"{directory}: stage {meta.get('stage')!r} is not a gradient target "
                        "(make one with get_gradients.py --anchor)")
    path = directory / TARGET_FILE
    if not path.exists():
        raise UserError(f"{path}: missing (did the anchor run finish?)")
    tensors, file_meta = load_tensors(path)
    if file_meta.get("format") != TARGET_FORMAT or file_meta.get("version") != TARGET_VERSION:
        raise UserError(f"{path}: not a version-{TARGET_VERSION} gradient target")
    info = meta["target"]
    flags = meta.get("flags") or {}
    target = Target.from_tensors(tensors, info["layout"], mode=flags.get("mode", "full"),
                                 param_set=flags.get("params", "all"), norm=info.get("norm"),
                                 renormalized=info.get("renormalized", False))
    return target, meta


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
    model, tokenizer, adam = _setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state,
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
        acc = ScoreAccumulator(bank)
        engine.run(items, pad_id, acc)
        return {"inner": acc.inner.detach().double().cpu(), "sqnorm": acc.sq.detach().double().cpu()}

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
    model, tokenizer, adam = _setup_model(model_name, dtype, device, mode, lora, lora_path, optimizer_state,
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
        acc = ProjectAccumulator(projector)
        engine.run(items, pad_id, acc)
        return {"features": acc.result().detach().float().cpu()}

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


__all__ = ["GradientEngine", "Target", "TargetBank", "bank_for", "AnchorResult", "AdamState", "score_batch", "project_batch",
           "anchor_gradients", "build_target", "score_pool", "extract_gradient_features", "load_target",
           "load_adam_state", "apply_lora", "init_distributed", "discover_sites"]
