"""One batch in, per-example results out: the calls the stages, tests and benchmarks share."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import data as D
from ..projection import FactoredProjector, Projector
from .accumulators import ProjectAccumulator, ScoreAccumulator
from .bank import TargetBank
from .engine import GradientEngine, get_engine
from .lora import AdamState
from .targets import Target


@dataclass(frozen=True)
class Scores:
    """One batch's scores, all in the compute dtype except n_supervised: inner [B, J] = <G_i, T_j>,
    sqnorm [B] = ||G_i||^2, loss [B] each example's mean token loss, n_supervised [B] its supervised tokens."""

    inner: torch.Tensor
    sqnorm: torch.Tensor
    loss: torch.Tensor
    n_supervised: torch.Tensor


def score_batch(engine: GradientEngine, bank: TargetBank, items: list[D.Encoded], pad_id: int) -> Scores:
    """<G_i, T_j> for every target of the bank, ||G_i||^2 and the loss, from one forward + backward.

    bank: the run's targets laid out for this engine, made once (`TargetBank(targets, engine)`;
    `TargetBank([], engine)` for norms only)."""
    if not bank.made_for(engine):
        raise ValueError("score_batch: the TargetBank was made for another model or settings than the engine's")
    run = engine.run(items, pad_id, ScoreAccumulator(bank))
    return Scores(run.output.inner, run.output.sqnorm, run.loss, run.n_supervised)


def bank_for(model: torch.nn.Module, targets: list[Target], adam: AdamState | None = None,
             path: str = "auto") -> tuple[TargetBank, GradientEngine]:
    """The engine for the targets' settings and the targets laid out for it, for repeated score_batch calls
    (what a benchmark wants): `score_batch(engine, bank, items, pad_id)`."""
    engine = get_engine(model, targets[0].param_set, targets[0].mode, adam, path)
    return TargetBank(targets, engine), engine


def project_batch(engine: GradientEngine, projector: Projector, items: list[D.Encoded],
                  pad_id: int) -> torch.Tensor:
    """[B, proj_dim] projected per-example gradients (projector: made for this engine's parameters,
    projector_for)."""
    return engine.run(items, pad_id, ProjectAccumulator(projector)).output


def projector_for(engine: GradientEngine, proj_dim: int, seed: int = 0) -> FactoredProjector:
    """The factored projection of the engine's parameters (a vector parameter as a (1, n) layer)."""
    shapes = {n: (s if len(s) == 2 else (1, s[0])) for n, s in engine.shapes.items()}
    return FactoredProjector(shapes, proj_dim, seed=seed, device=engine.device, dtype=engine.compute_dtype)
