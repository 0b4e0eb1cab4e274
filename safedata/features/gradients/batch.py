"""One batch in, per-example results out: the calls the stages, tests and benchmarks share."""
from __future__ import annotations

import torch

from ... import data as D
from ..projection import FactoredProjector
from .accumulators import ProjectAccumulator, ScoreAccumulator
from .bank import TargetBank
from .engine import GradientEngine, get_engine
from .lora import AdamState
from .targets import Target


def score_batch(model, items: list[D.Encoded], targets, pad_id: int, params=None, mode=None,
                adam: AdamState | None = None, path="auto", with_loss=False,
                engine: GradientEngine | None = None) -> tuple[torch.Tensor, ...]:
    """(inner [B, n_targets], sqnorm [B]) = (<G_i, T_j>, ||G_i||^2), from one forward + backward
    (with_loss: and each example's mean token loss [B], a third element).

    targets: a TargetBank (made once, `TargetBank(targets, engine)`, for repeated calls with that engine), a list
    of Target (moved to the device at each call), or None (norms only). params/mode default to the targets'.
    engine: the run's engine (made once by the caller: it keeps its workspace between batches); made here if
    not given.
    """
    if isinstance(targets, Target):
        targets = [targets]
    if isinstance(targets, TargetBank):
        bank = targets
        engine = engine or get_engine(model, bank.param_set, bank.mode, adam, path)
        wanted = (params or bank.param_set, mode or bank.mode)
        if engine.model is not model or wanted != (bank.param_set, bank.mode) or wanted != (engine.params, engine.mode):
            raise ValueError("score_batch: the TargetBank was made for another model or settings")
    elif engine is not None:
        bank = TargetBank(targets, engine) if targets else None
    else:
        first = targets[0] if targets else None
        params = params or (first.param_set if first else "all")
        mode = mode or (first.mode if first else "full")
        engine = get_engine(model, params, mode, adam, path)
        bank = TargetBank(targets, engine) if targets else None
    acc = ScoreAccumulator(bank)
    engine.run(items, pad_id, acc)
    return (acc.inner, acc.sq, engine.example_loss) if with_loss else (acc.inner, acc.sq)


def bank_for(model, targets: list[Target], adam: AdamState | None = None,
             path="auto") -> tuple[TargetBank, GradientEngine]:
    """Targets moved to the model's device once, and the engine to score them with, for repeated score_batch
    calls (what a benchmark wants): `score_batch(model, items, bank, pad_id, engine=engine)`."""
    engine = get_engine(model, targets[0].param_set, targets[0].mode, adam, path)
    return TargetBank(targets, engine), engine


def project_batch(model, items, projector, pad_id: int, params="all", mode="full", adam=None,
                  engine: GradientEngine | None = None) -> torch.Tensor:
    """[B, proj_dim] projected per-example gradients (engine: the run's own, made for these settings)."""
    engine = engine or get_engine(model, params, mode, adam)
    acc = ProjectAccumulator(projector)
    engine.run(items, pad_id, acc)
    return acc.result()


def projector_for(engine: GradientEngine, proj_dim: int, seed: int = 0):
    shapes = {n: (s if len(s) == 2 else (1, s[0])) for n, s in engine.shapes.items()}
    return FactoredProjector(shapes, proj_dim, seed=seed, device=engine.device, dtype=engine.compute_dtype)
