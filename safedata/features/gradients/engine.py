"""The engine: hooks on the tracked modules, one batched forward + backward, results fed to an accumulator.

During a run every weight's requires_grad is off (no .grad buffer, no weight-gradient matmuls) and the caller's
flags are put back afterwards (frozen_weights); the input embeddings' output is made a leaf that requires grad,
so the backward flows through activations only. The batch loss is sum_i L_i, so the output-gradient a hook sees
at a token of example i is example i's own. What is done with each layer's (input, output-grad) pair is the
accumulator's business (accumulators.py): it is given a BatchContext at the start of the batch and the layers'
tensors after that (context.py), never the engine. A run returns a BatchResult: the accumulator's result and
each example's loss and supervised-token count; the engine keeps nothing of a batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

import torch
import torch.nn.functional as F

from ... import data as D
from ...errors import UserError
from .lora import AdamState
from .context import Accumulator, BatchContext, LayerInput, Workspace
from .numerics import Numerics, memory_cost, segment_sum
from .sites import Site, discover_sites, param_shapes, unwrap

R = TypeVar("R")


@dataclass(frozen=True)
class BatchResult(Generic[R]):
    """One run: what the accumulator's end() returned, each example's mean token loss [B] (compute dtype) and its
    number of supervised tokens [B]."""

    output: R
    loss: torch.Tensor
    n_supervised: torch.Tensor


@contextlib.contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """requires_grad off on every parameter for the block, each flag put back as the caller had it after."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


PATHS = ("auto", "ghost", "materialise")


class GradientEngine:
    """The settings of a run's gradient (the tracked sites, numerics, path, Adam state); run() installs the hooks
    for one batch, runs forward + backward under frozen_weights, feeds an accumulator and returns a BatchResult.
    The model is only read: its requires_grad flags are the caller's again after each run."""

    def __init__(self, model: torch.nn.Module, params: str = "all", mode: str = "full", adam: AdamState | None = None,
                 path: str = "auto"):
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
        self.params, self.mode = params, mode
        self.sites = discover_sites(model, params, mode)
        self.shapes = param_shapes(model, self.sites)
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.num = Numerics(self.device, self.dtype)
        self.compute_dtype = self.num.compute_dtype
        self.vocab = self.embed.weight.shape[0]
        self.adam = adam.to(self.device, self.compute_dtype) if adam is not None else None
        if path not in PATHS:
            raise ValueError(f"path {path!r}: choose from {PATHS}")
        self.path = path
        heads = [s for s in self.sites if s.head]
        embeds = [s for s in self.sites if s.kind == "embedding"]
        self.tied = heads[0].weight if heads and embeds and heads[0].weight == embeds[0].weight else None
        self.beta = memory_cost(self.device)
        self.workspace = Workspace(self.num, self.device)   # reused by every batch (the only thing that is)

    def run(self, items: list[D.Encoded], pad_id: int, acc: Accumulator[R]) -> BatchResult[R]:
        """One forward + backward of `items` (padded with pad_id), each tracked layer fed to `acc`."""
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
        hooks = _BatchHooks(self, acc, ids, attn.bool(), hmask)
        acc.begin(BatchContext(ids, self.num, self.device, self.path, self.beta, self.tied, self.vocab,
                               self.workspace))
        with frozen_weights(self.model), hooks.installed():
            with torch.enable_grad():
                out = self.decoder(input_ids=ids, attention_mask=attn, use_cache=False)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                hs = hidden.gather(1, pos[..., None].expand(B, S, hidden.shape[-1]))
                logits = self.head(hs)
                rows = torch.arange(B, device=self.device)[:, None].expand(B, S)[hmask]
                ce = F.cross_entropy(logits[hmask].to(self.compute_dtype), target_ids[hmask], reduction="none")
                per_token = ce / counts.to(self.compute_dtype)[rows]
                loss = per_token.sum()                             # sum over examples of each one's token mean
                # each example's own mean token loss (rows is sorted: example-major order)
                example_loss = segment_sum(per_token.detach(), rows, B, presorted=True)
                del out, hidden, hs, logits, ce, per_token
                if hooks.leaf is None:
                    raise UserError("the input embeddings' forward hook did not run (unsupported model)")
                torch.autograd.grad(loss, hooks.leaf)
        return BatchResult(acc.end(), example_loss, counts)


class _BatchHooks:
    """One batch's hooks and what they share while it runs (masks, the Linear inputs by tensor, the embedding's
    leaf): made by GradientEngine.run for that batch and dropped with it, so the engine keeps no batch state."""

    def __init__(self, engine: GradientEngine, acc: Accumulator, ids: torch.Tensor, mask: torch.Tensor,
                 hmask: torch.Tensor):
        self.engine, self.acc, self.ids, self.mask, self.hmask = engine, acc, ids, mask, hmask
        self.num, self.compute_dtype = engine.num, engine.compute_dtype
        self.inputs: dict[int, LayerInput] = {}
        self.leaf: torch.Tensor | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        engine = self.engine
        handles = [engine.embed.register_forward_hook(self._embedding_forward)]
        try:
            for site in engine.sites:
                if site.kind == "linear":
                    handles.append(site.module.register_forward_hook(self._make_linear_forward(site)))
                elif site.kind == "norm":
                    handles.append(site.module.register_forward_hook(self._make_norm_forward(site)))
            yield
        finally:
            for h in handles:
                h.remove()
            self.inputs = {}
            self.leaf = None

    def _embedding_forward(self, module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        self.leaf = leaf
        site = next((s for s in self.engine.sites if s.kind == "embedding"), None)
        if site is not None:
            token_ids = inputs[0] if inputs else self.ids
            leaf.register_hook(lambda g: self._embedding_backward(site, token_ids, g))
        return leaf

    def _embedding_backward(self, site: Site, token_ids, g):
        mask = self.mask
        padding_idx = getattr(site.module, "padding_idx", None)
        if padding_idx is not None and bool((token_ids == padding_idx).any()):
            # nn.Embedding(padding_idx=p) never updates row p: autograd's gradient of that row is zero
            mask = mask & (token_ids != padding_idx)
            g = torch.where(mask[..., None], g, torch.zeros((), dtype=g.dtype, device=g.device))
        self.acc.embedding(site, token_ids, g, mask)

    def _make_linear_forward(self, site: Site):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            x = inputs[0]
            entry = self.inputs.get(id(x))
            if entry is None:
                entry = self.inputs[id(x)] = LayerInput(x, self.num)
            entry.users += 1
            holder = [entry]
            output.register_hook(lambda g: self._linear_backward(site, holder, g))
            return None
        return hook

    def _linear_backward(self, site: Site, holder, g):
        # No masking copies: padding is on the right of a causal LM, so no supervised position attends to a
        # padded one and g is exactly zero there (and at the head's unsupervised slots, which are not in the
        # loss); the inputs at padded positions are finite (they attend to their example's own tokens), so
        # every product g_t x_t^T, Gram entry and factor product of a padded position is exactly zero.
        entry = holder.pop()
        mask = self.hmask if site.head else self.mask
        if entry.x is None:
            entry.x = entry.raw
        if site.bias:
            self.acc.dense(site.bias, g.to(self.compute_dtype).sum(1))
        if site.lora:
            grads = self.num.bmm(g.transpose(1, 2), entry.x)        # [B, out, in]: small (LoRA)
            adam = self.engine.adam
            if adam is not None:
                grads = adam.apply(site.weight, grads)
            self.acc.dense(site.weight, grads.reshape(grads.shape[0], -1))
        else:
            self.acc.linear(site, entry, g, mask)
        entry.users -= 1
        if entry.users == 0:
            self.inputs.pop(id(entry.raw), None)
            entry.release()

    def _make_norm_forward(self, site: Site):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            holder = [inputs[0]]
            output.register_hook(lambda g: self._norm_backward(site, holder, g))
            return None
        return hook

    def _norm_backward(self, site: Site, holder, g):
        x = holder.pop()
        module = site.module
        w = dict(module.named_parameters(recurse=False))
        with torch.no_grad():
            one = {n: (torch.ones_like(p) if n == "weight" else torch.zeros_like(p)) for n, p in w.items()}
            zero = {n: torch.zeros_like(p) for n, p in w.items()}
            normed = torch.func.functional_call(module, one, (x,)) - torch.func.functional_call(module, zero, (x,))
        gc = g.to(self.compute_dtype)                       # zero at padded positions (see _linear_backward)
        self.acc.dense(site.weight, (gc * normed.to(self.compute_dtype)).sum(1))
        if site.bias:
            self.acc.dense(site.bias, gc.sum(1))


def get_engine(model: torch.nn.Module, params: str = "all", mode: str = "full", adam: AdamState | None = None,
               path: str = "auto") -> GradientEngine:
    """An engine for the model with these settings. Not cached on the model: an engine is cheap to make (it finds
    the tracked modules), holds no hooks or batch between runs, and a stage makes one and keeps it for its run.
    path: auto (the cost model picks each layer's way), or ghost / materialise forced (tests, benchmarks)."""
    return GradientEngine(model, params, mode, adam, path)
