"""An anchor file becomes a target: T = mean_a G_a/||G_a||, exact and compact, with its norm."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ... import data as D
from ...errors import UserError
from .accumulators import CaptureAccumulator, ScoreAccumulator
from .engine import get_engine
from .lora import AdamState
from .targets import LAYOUTS, Target, TargetBank


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
