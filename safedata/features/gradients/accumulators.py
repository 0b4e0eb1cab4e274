"""Accumulators: what the engine's hooks do with each layer's inputs and output-grads, for one batch.

ScoreAccumulator: ||G_i||^2 and <G_i, T_j> per example (the scores, and Self-Inf), each layer by the strategy
layers.py has for it;
CaptureAccumulator: the same, plus each anchor's factors / rows / dense parts (TargetPieces builds the target);
ProjectAccumulator: the per-example gradients' random projection (projection.py).
Each implements context.Accumulator: begin(batch) with the batch's BatchContext, dense(name, v),
linear(site, layer_input, g, mask), embedding(site, token_ids, g, mask), then end(), which returns the batch's
result (the engine hands it back from GradientEngine.run): nothing is read off an accumulator afterwards, and
none reads the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..projection import Projector
from .bank import NO_TARGETS, TargetBank
from .context import Accumulator, BatchContext, Products
from .layers import DENSE, EMBEDDING, Sums, TiedHead, choose_linear
from .targets import ParamTarget


class ScoreAccumulator(Accumulator[Products]):
    """Per batch: sqnorm [B] = ||G_i||^2 and inner [B, J] = <G_i, T_j> (bank: the targets; None: norms only),
    layer by layer in the hooks; end() returns them as Products."""

    def __init__(self, bank: TargetBank | None = None):
        self._targets = bank.get if bank is not None else (lambda name: NO_TARGETS)
        self._n_targets = bank.n if bank is not None else 0

    def begin(self, batch: BatchContext) -> None:
        super().begin(batch)
        self._sums = Sums(batch, self._n_targets)
        self._tied = TiedHead(batch.token_ids) if batch.tied is not None else None

    def end(self) -> Products:
        if self._tied is not None:
            self._tied.finish()
        sums = self._sums
        del self._sums, self._tied
        return Products(sums.inner, sums.sq)

    # -------------------------------------------------------------- the three kinds of site

    def dense(self, name, v):
        v = v.to(self._sums.compute_dtype)
        DENSE.add(self._sums, v, self._targets(name))
        self.after_dense(name, v)

    def linear(self, site, layer_input, g, mask):
        sums, batch = self._sums, self.batch
        x = layer_input.operand()
        g_orig, g = g, sums.num.operand(g)
        _, T, n = x.shape
        targets = self._targets(site.weight)
        choose_linear(batch.path, batch.beta, T, n, g.shape[-1], targets).add(sums, layer_input, x, g, targets)
        TiedHead.head_against_rows(sums, x, g, targets)   # a tied LM head against a target's embedding rows
        if site.head and batch.tied == site.weight:
            self._tied.keep_head(x, g)                    # for the embedding's hook: the cross term 2<E_i, H_i>
        self.after_linear(site, layer_input, g_orig, mask)

    def embedding(self, site, token_ids, g, mask):
        sums, batch = self._sums, self.batch
        targets = self._targets(site.weight)
        rows, ub, uid = EMBEDDING.add(sums, token_ids, g, mask, batch.vocab, targets)
        TiedHead.embedding_against_head_factors(sums, rows, ub, uid, targets)   # tied: a target's head factors
        if batch.tied == site.weight:
            self._tied.add_cross_term(sums, g)
        self.after_embedding(site, rows, ub, uid)

    # -------------------------------------------------------------- what a subclass adds (CaptureAccumulator)

    def after_dense(self, name, v):
        pass

    def after_linear(self, site, layer_input, g, mask):
        pass

    def after_embedding(self, site, rows, ub, uid):
        pass


def _no_pieces() -> dict[str, list]:
    return {"fact": [], "rows": [], "dense": []}


@dataclass(frozen=True)
class Captured:
    """One anchor batch: its products (the norms) and its pieces of the target, per parameter: factors
    (g, x, owner) of Linear weights, rows (owner, token id, row) of the embedding, dense parts (owners, v)."""
    products: Products
    pieces: dict[str, dict[str, list]]


class CaptureAccumulator(ScoreAccumulator):
    """Anchor pass, one batch: the norms, plus each anchor's factors / rows / dense parts for building the target.
    owners [B]: each example's position in the anchor set (the coefficient it is scaled by in TargetPieces.build)."""

    def __init__(self, owners: torch.Tensor):
        super().__init__(None)
        self._owners = owners
        self._pieces: dict[str, dict[str, list]] = {}

    def _piece(self, name):
        return self._pieces.setdefault(name, _no_pieces())

    def end(self) -> Captured:
        pieces, self._pieces = self._pieces, {}
        return Captured(super().end(), pieces)

    def after_dense(self, name, v):
        self._piece(name)["dense"].append((self._owners.cpu(), v.detach().cpu()))

    def after_linear(self, site, layer_input, g, mask):
        keep = mask & (g != 0).any(-1)
        owner = self._owners.to(g.device)[:, None].expand(keep.shape)[keep]
        self._piece(site.weight)["fact"].append((g[keep].cpu(), layer_input.x[keep].cpu(), owner.cpu()))

    def after_embedding(self, site, rows, ub, uid):
        self._piece(site.weight)["rows"].append((self._owners.to(ub.device)[ub].cpu(), uid.cpu(), rows.cpu()))


class TargetPieces:
    """Every anchor batch's pieces of the target, in batch order (add), and the target made from them (build)."""

    def __init__(self):
        self._pieces: dict[str, dict[str, list]] = {}

    def add(self, captured: Captured) -> None:
        for name, kinds in captured.pieces.items():
            mine = self._pieces.setdefault(name, _no_pieces())
            for kind, items in kinds.items():
                mine[kind].extend(items)

    def build(self, coef: torch.Tensor, shapes: dict, compute_dtype, device, layout="auto", model_dtype=None) -> dict:
        """coef[a] = 1/(N ||G_a||): the target's parts, each stored in its smallest exact form."""
        out = {}
        coef = coef.to(compute_dtype)
        for name, shape in shapes.items():
            pieces = self._pieces.get(name, _no_pieces())
            p = ParamTarget(tuple(shape))
            if pieces["dense"]:
                total = torch.zeros(int(torch.tensor(shape).prod()), dtype=compute_dtype)
                for owners, v in pieces["dense"]:
                    total += (coef[owners][:, None] * v.to(compute_dtype)).sum(0)
                p.dense = total.view(shape)
            if pieces["fact"]:
                p.fact_g = torch.cat([f[0] for f in pieces["fact"]])
                p.fact_x = torch.cat([f[1] for f in pieces["fact"]])
                p.fact_scale = coef[torch.cat([f[2] for f in pieces["fact"]])]
            if pieces["rows"]:
                owners = torch.cat([r[0] for r in pieces["rows"]])
                uid = torch.cat([r[1] for r in pieces["rows"]])
                vals = torch.cat([r[2] for r in pieces["rows"]]).to(compute_dtype) * coef[owners][:, None]
                ids, inv = torch.unique(uid, return_inverse=True)
                p.rows_ids = ids
                p.rows_val = torch.zeros(ids.numel(), shape[1], dtype=compute_dtype).index_add_(0, inv, vals)
            if p.dense is None and p.fact_g is None and p.rows_ids is None:
                p.dense = torch.zeros(shape, dtype=compute_dtype)
            numel = int(torch.tensor(shape).prod())
            dense_bytes = numel * torch.tensor([], dtype=compute_dtype).element_size()
            want_dense = layout == "dense" or (layout == "auto" and p.nbytes() >= dense_bytes)
            if p.form != "dense" and (want_dense or p.dense is not None):
                p = ParamTarget(tuple(shape), dense=p.to_dense(compute_dtype, device).cpu())
            out[name] = p
        return out



class ProjectAccumulator(Accumulator[torch.Tensor]):
    """Per batch: the per-example gradients' random projection [B, proj_dim] (projection.Projector); end()
    returns it."""

    def __init__(self, projector: Projector):
        self._projector = projector

    def begin(self, batch: BatchContext) -> None:
        super().begin(batch)
        self._parts: dict[str, torch.Tensor] = {}

    def _add(self, name, value):
        self._parts[name] = value if name not in self._parts else self._parts[name] + value

    def dense(self, name, v):
        self._add(name, self._projector.project_dense(name, v))

    def linear(self, site, layer_input, g, mask):
        self._add(site.weight, self._projector.project_linear(site.weight, g, layer_input.x))

    def embedding(self, site, token_ids, g, mask):
        self._add(site.weight, self._projector.project_embedding(site.weight, g, token_ids))

    def end(self) -> torch.Tensor:
        parts, self._parts = self._parts, {}
        return self._projector.project(parts)
