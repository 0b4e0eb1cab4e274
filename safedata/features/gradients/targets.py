"""Targets: what an anchor file becomes (Target, ParamTarget), how it is stored on disk, and the TargetBank
that arranges all targets of a run per parameter on the device for the hooks."""
from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import MetadataMismatch, UserError
from ...store import META, load_tensors, read_json
from .numerics import FactoredLayer, choose_dense_copies, dense_copy_budget, memory_cost

if TYPE_CHECKING:
    from .engine import GradientEngine

TARGET_FILE = "target.safetensors"
LOCK_FILE = ".target.lock"
TARGET_FORMAT = "safedata.gradient_target"
TARGET_VERSION = "1"
LAYOUTS = ("auto", "factored", "dense")


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
            # rows_ids are distinct: no two adds meet, so even CUDA's atomic index_add_ gives fixed bits
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

    __slots__ = ("G", "X", "W", "dense_mat", "dense_cols", "full_mat", "full_cols", "rows")

    def __init__(self):
        self.G = self.X = self.W = None
        self.dense_mat = self.dense_cols = self.full_mat = self.full_cols = None
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


class TargetBank:
    """Targets on the device, arranged per parameter for the hooks (all targets of a layer together).

    release: empty each Target's parameters as soon as the bank holds them, so that the targets are never
    held twice (the scoring stage passes targets it loaded for the bank alone)."""

    def __init__(self, targets: list[Target], engine: GradientEngine, densify: bool = True, release: bool = False):
        self.n = len(targets)
        self.engine = engine
        self.params: dict[str, _ParamBank] = {}
        dev, cdt, num = engine.device, engine.cdt, engine.num
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
        factored: dict[str, list[int]] = {}
        for name in (targets[0].params if targets else ()):
            bank = self.params[name] = _ParamBank()
            dense, facts = [], []
            for j, target in enumerate(targets):
                p = target.params[name]
                if release:
                    target.params[name] = ParamTarget(p.shape)
                if p.dense is not None:
                    dense.append((j, p.dense.to(device=dev, dtype=cdt).reshape(-1)))
                if p.rows_ids is not None:
                    lookup = torch.full((p.shape[0],), -1, dtype=torch.long, device=dev)
                    ids = p.rows_ids.to(dev, torch.long)
                    lookup[ids] = torch.arange(ids.numel(), device=dev)
                    bank.rows.append((j, lookup, ids, p.rows_val.to(device=dev, dtype=cdt)))
                if p.fact_g is not None:
                    facts.append((j, p))
            if facts:
                factored[name] = [j for j, _ in facts]
                bank.G = torch.cat([num.operand(p.fact_g.to(dev)) for _, p in facts])
                bank.X = torch.cat([num.operand(p.fact_x.to(dev)) for _, p in facts])
                bank.W = torch.zeros(bank.G.shape[0], self.n, dtype=cdt, device=dev)
                row = 0
                for j, p in facts:
                    bank.W[row:row + p.fact_g.shape[0], j] = p.fact_scale.to(device=dev, dtype=cdt)
                    row += p.fact_g.shape[0]
            if dense:
                bank.dense_cols = torch.tensor([j for j, _ in dense], dtype=torch.long, device=dev)
                bank.dense_mat = torch.stack([d for _, d in dense])
            del dense, facts, p
        self.densified: list[str] = []
        if densify:
            self.densify(factored)

    def densify(self, factored: dict[str, list[int]]) -> None:
        """Add a dense copy of the factored targets of the Linear layers where materialising the per-example
        gradient and one GEMM against every target beats factor products (numerics.choose_dense_copies),
        within dense_copy_budget(the model's size)."""
        e = self.engine
        linear = {s.weight for s in e.sites if s.kind == "linear" and not s.lora}
        layers = [FactoredLayer(name, *e.shapes[name], self.params[name].K, self.params[name].Jd, len(cols))
                  for name, cols in factored.items() if name in linear and len(e.shapes[name]) == 2]
        size = torch.tensor([], dtype=e.cdt).element_size()
        budget = dense_copy_budget(sum(p.numel() * p.element_size() for p in e.model.parameters()))
        for name, _ in choose_dense_copies(layers, memory_cost(e.device), budget, size):
            bank = self.params[name]
            cols = factored[name]
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


@contextlib.contextmanager
def target_lock(directory):
    """An exclusive lock on DIRECTORY/.target.lock (fcntl.flock) held while a target is checked and built, so
    that concurrent builders of one target (every task of a SLURM array runs the anchor builds) build it once:
    the first builds, the others wait, then find it built with the same settings and keep it. Every task
    therefore scores against the same target bytes. flock works on local disks and NFSv4; on a shared file
    system without it (e.g. Lustre mounted without -o flock) the lock fails with a clear error: submit the
    anchor builds as their own job and the scoring array with --dependency=afterok on it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--output_dir {directory}: is a file, not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as err:
            raise UserError(f"{path}: cannot take a file lock here ({err}); build the targets in one job and "
                            "start the scoring array after it (sbatch --dependency=afterok:JOB)") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")      # who holds it (for a person looking at a waiting array task)
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
