"""The TargetBank: every target of a run arranged per parameter on the device, in the forms the engine's hooks
read (dense matrices, concatenated factors, embedding rows), with a dense copy of factored layers where that is
cheaper (densify)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...errors import MetadataMismatch
from .numerics import FactoredLayer, choose_dense_copies, dense_copy_budget, memory_cost
from .targets import ParamTarget, StoredTensor, Target, loaded

if TYPE_CHECKING:
    from .engine import GradientEngine


class _ParamBank:
    """One parameter's part of all targets, in the forms the hooks use.

    dense_mat [n_dense_targets, numel]: the targets stored dense (dense_cols: their target index), one GEMM for
    all of them;
    G, X, W: the factored targets concatenated (W [K, J] = scale x one-hot(target));
    full_mat [Jf, numel] (full_cols): optional, every dense or factored target of the layer as a dense matrix
    (dense_mat is its first n_dense_targets rows), made where materialising the layer's per-example gradient and
    one GEMM against it is cheaper than factor products (see TargetBank.densify);
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
    def n_dense_targets(self):
        return 0 if self.dense_mat is None else self.dense_mat.shape[0]

    @property
    def dense(self) -> list[tuple[int, torch.Tensor]]:
        """(target index, dense part [numel]) per densely stored target."""
        if self.dense_mat is None:
            return []
        return list(zip(self.dense_cols.tolist(), self.dense_mat.unbind(0)))


# A parameter no target covers (every target of a norms-only run, an empty bank): no factors, rows or dense parts,
# so a strategy reads it like any other and adds nothing to the products.
NO_TARGETS = _ParamBank()


class TargetBank:
    """Targets on the device, arranged per parameter for the hooks (all targets of a layer together).

    release: empty each Target's parameters as soon as the bank holds them, so that the targets are never
    held twice (the scoring stage passes targets it loaded for the bank alone). The engine is read while the bank is
    laid out (the model's parameters, device and dtypes) and not kept: the bank is data, and the caller runs the
    engine with it (batch.score_batch). No targets make an empty bank: norms only (Self-Inf)."""

    def __init__(self, targets: list[Target], engine: GradientEngine, densify: bool = True, release: bool = False):
        self.n = len(targets)
        self.param_set, self.mode = engine.params, engine.mode
        self.shapes = dict(engine.shapes)
        self.params: dict[str, _ParamBank] = {}
        dev, compute_dtype, num = engine.device, engine.compute_dtype, engine.num
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
                    dense.append((j, p.dense))
                if p.rows_ids is not None:
                    lookup = torch.full((p.shape[0],), -1, dtype=torch.long, device=dev)
                    ids = p.rows_ids.to(dev, torch.long)
                    lookup[ids] = torch.arange(ids.numel(), device=dev)
                    bank.rows.append((j, lookup, ids, p.rows_val.to(device=dev, dtype=compute_dtype)))
                if p.fact_g is not None:
                    facts.append((j, p))
            if facts:
                factored[name] = [j for j, _ in facts]
                bank.G = torch.cat([num.operand(p.fact_g.to(dev)) for _, p in facts])
                bank.X = torch.cat([num.operand(p.fact_x.to(dev)) for _, p in facts])
                bank.W = torch.zeros(bank.G.shape[0], self.n, dtype=compute_dtype, device=dev)
                row = 0
                for j, p in facts:
                    bank.W[row:row + p.fact_g.shape[0], j] = p.fact_scale.to(device=dev, dtype=compute_dtype)
                    row += p.fact_g.shape[0]
            if dense:
                bank.dense_cols = torch.tensor([j for j, _ in dense], dtype=torch.long, device=dev)
                bank.dense_mat = self._stacked([d for _, d in dense], dev, num.operand_dtype)
            del dense, facts, p
        self.densified: list[str] = []
        if densify:
            self.densify(engine, factored)

    @staticmethod
    def _stacked(parts: list, device, dtype) -> torch.Tensor:
        """[len(parts), numel]: the targets' dense parts of one parameter as rows, each written once into place (a
        StoredTensor already in the bank's dtype is read from its file straight into its row)."""
        out = torch.empty(len(parts), parts[0].numel(), dtype=dtype, device=device)
        for row, part in enumerate(parts):
            if isinstance(part, StoredTensor) and part.dtype == dtype and out.device.type == "cpu":
                part.read_into(out[row])
            else:
                out[row] = loaded(part).to(device=device, dtype=dtype).reshape(-1)
        return out

    def densify(self, engine: GradientEngine, factored: dict[str, list[int]]) -> None:
        """Add a dense copy of the factored targets of the Linear layers where materialising the per-example
        gradient and one GEMM against every target beats factor products (numerics.choose_dense_copies),
        within dense_copy_budget(the model's size)."""
        e = engine
        linear = {s.weight for s in e.sites if s.kind == "linear" and not s.lora}
        layers = [FactoredLayer(name, *e.shapes[name], self.params[name].K, self.params[name].n_dense_targets,
                                len(cols))
                  for name, cols in factored.items() if name in linear and len(e.shapes[name]) == 2]
        size = torch.tensor([], dtype=e.num.operand_dtype).element_size()
        budget = dense_copy_budget(sum(p.numel() * p.element_size() for p in e.model.parameters()))
        for name, _ in choose_dense_copies(layers, memory_cost(e.device), budget, size):
            bank = self.params[name]
            cols = factored[name]
            G, X, W = bank.G.to(e.compute_dtype), bank.X.to(e.compute_dtype), bank.W
            extra = torch.stack([((G * W[:, j:j + 1]).T @ X).reshape(-1) for j in cols]).to(e.num.operand_dtype)
            if bank.dense_mat is not None:
                extra = torch.cat([bank.dense_mat, extra])
                cols = bank.dense_cols.tolist() + cols
            bank.full_mat = extra
            bank.full_cols = torch.tensor(cols, dtype=torch.long, device=e.device)
            if bank.dense_mat is not None:
                bank.dense_mat = bank.full_mat[:bank.n_dense_targets]
            self.densified.append(name)

    def get(self, name: str) -> _ParamBank:
        """The targets' parts at one parameter (NO_TARGETS where none covers it)."""
        return self.params.get(name, NO_TARGETS)

    def made_for(self, engine: GradientEngine) -> bool:
        """Whether the bank was laid out for this engine's gradient (the same parameters, mode and shapes)."""
        return (self.param_set, self.mode, self.shapes) == (engine.params, engine.mode, dict(engine.shapes))

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
