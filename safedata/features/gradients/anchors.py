"""An anchor file becomes a target: T = mean_a G_a/||G_a||, exact and compact, with its norm.

With cumulative=True (get_gradients.py --anchor --original_quirks) the target is what the original code
computed: it never zeroed gradients between anchors, so its gradient for anchor i was C_i = G_0 + ... + G_i
(file order); each C_i was normalised and the results averaged:

    T = (1/N) sum_i C_i / ||C_i|| = sum_a w_a G_a,   w_a = (1/N) sum_{i >= a} 1 / ||C_i||,
    ||C_i||^2 = sum_{a, b <= i} <G_a, G_b>

so it is exact from the anchors' Gram matrix (anchor_gram) as coefficients on the per-anchor gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ... import data as D
from ...errors import UserError
from ...progress import progress as progress_bar
from .accumulators import CaptureAccumulator, TargetPieces
from .batch import score_batch
from .engine import GradientEngine, get_engine
from .lora import AdamState
from .bank import TargetBank
from .targets import LAYOUTS, Target


@dataclass
class AnchorResult:
    target: Target
    sqnorm: torch.Tensor      # [N] ||G_a||^2
    inner: torch.Tensor       # [N] <G_a, T> (before renormalisation)


def anchor_gradients(model, items: list[D.Encoded], pad_id: int, params="all", mode="full", batch_size=8,
                     adam: AdamState | None = None, renormalize=False, layout="auto", path="auto",
                     progress=False, cumulative=False) -> AnchorResult:
    """The target T = mean_a G_a/||G_a|| of the anchors (exact, compact), its norm, per-anchor cosines
    (cumulative: the original code's T = mean_i C_i/||C_i||, see the module's docstring)."""
    if layout not in LAYOUTS:
        raise UserError(f"target layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    engine = get_engine(model, params, mode, adam, path)
    return anchor_target(engine, items, pad_id, batch_size, renormalize, layout, progress, cumulative)


def anchor_target(engine: GradientEngine, items: list[D.Encoded], pad_id: int, batch_size=8, renormalize=False,
                  layout="auto", progress=False, cumulative=False) -> AnchorResult:
    """anchor_gradients with a given engine."""
    params, mode = engine.params, engine.mode
    n = len(items)
    pieces = TargetPieces()
    sq = torch.zeros(n, dtype=torch.float64)
    batches = D.length_bucketed_batches([len(it) for it in items], batch_size)
    for positions in progress_bar(batches, desc="anchors", unit="batch", disable=not progress):
        owners = torch.tensor(positions, dtype=torch.long)
        captured = engine.run([items[p] for p in positions], pad_id, CaptureAccumulator(owners)).output
        pieces.add(captured)
        sq[positions] = captured.products.sqnorm.detach().double().cpu()
        del captured
    bad = [items[i].id for i in range(n) if not math.isfinite(sq[i]) or sq[i] <= 0]
    if bad:
        raise UserError(f"anchor(s) with a non-finite or zero gradient: ids {', '.join(bad[:10])}")
    coef = cumulative_coefficients(anchor_gram(engine, items, pad_id, sq, batch_size, layout)) if cumulative \
        else 1.0 / (sq.sqrt() * n)
    parts = pieces.build(coef, engine.shapes, engine.compute_dtype, engine.device, layout, engine.dtype)
    del pieces
    target = Target(parts, mode, params)
    # ||T||^2 = sum_a coef_a <G_a, T>: one more pass over the anchors against the finished target.
    bank = TargetBank([target], engine)
    inner = torch.zeros(n, dtype=torch.float64)
    for positions in batches:
        scores = score_batch(engine, bank, [items[p] for p in positions], pad_id)
        inner[positions] = scores.inner[:, 0].detach().double().cpu()
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


def anchor_gram(engine: GradientEngine, items: list[D.Encoded], pad_id: int, sq: torch.Tensor, batch_size=8,
                layout="auto") -> torch.Tensor:
    """K[a, b] = <G_a, G_b> (fp64) for the anchors: one target per anchor (G_a/||G_a||, together the size of
    one target of all anchors), then one scoring pass of every anchor against all of them."""
    singles = [anchor_target(engine, [item], pad_id, 1, layout=layout).target for item in items]
    bank = TargetBank(singles, engine)
    gram = torch.zeros(len(items), len(items), dtype=torch.float64)
    for positions in D.length_bucketed_batches([len(it) for it in items], batch_size):
        scores = score_batch(engine, bank, [items[p] for p in positions], pad_id)
        gram[positions] = scores.inner.detach().double().cpu()       # <G_b, G_a>/||G_a||
    return gram * sq.sqrt()[None, :]


def cumulative_coefficients(gram: torch.Tensor) -> torch.Tensor:
    """w with sum_a w_a G_a = (1/N) sum_i C_i/||C_i||, C_i = G_0 + ... + G_i, from K = <G_a, G_b>."""
    n = gram.shape[0]
    prefix = gram.cumsum(0).cumsum(1)                       # prefix[i, j] = sum_{a <= i, b <= j} K[a, b]
    inv_norm = 1.0 / prefix.diagonal().clamp_min(0).sqrt()    # 1/||C_i||
    if not bool(torch.isfinite(inv_norm).all()):
        raise UserError("cumulative anchor gradients: a running sum of anchor gradients is zero")
    return inv_norm.flip(0).cumsum(0).flip(0) / n           # w_a = (1/N) sum_{i >= a} 1/||C_i||
