"""Random projections of per-example gradients that never form a per-example gradient: per layer a Kronecker
sketch P_out^T G P_in built from projected token vectors, unbiased for inner products (E[<proj(a), proj(b)>] =
<a, b>), seeded per layer and never stored (the derivation, the budget rule, the error variance and the memory:
docs/GRADIENTS.md).
"""
from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

from ..errors import UserError

KINDS = ("rademacher", "gaussian")
FORMAT = "safedata.FactoredProjector"
VERSION = 1                      # of the generation scheme: bump if any generated number could change
DENSE_BLOCK_ELEMENTS = 1 << 22   # a dense matrix is generated in row blocks of about this many numbers
DENSE_CACHE_ELEMENTS = 1 << 26   # a DenseProjector keeps its matrix if it has at most this many numbers


# ----------------------------------------------------------------------------- random matrices


def derive_seed(seed: int, *parts) -> int:
    """A 63-bit seed for one matrix: a hash of the global seed and the matrix's name and role."""
    text = "\x1f".join([str(int(seed)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)


def random_matrix(rows: int, cols: int, seed: int, kind: str) -> torch.Tensor:
    """rows x cols, iid entries with mean 0 and variance 1 (+-1 or N(0,1)), float32 on the CPU."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "rademacher":
        return torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
    if kind == "gaussian":
        return torch.randn((rows, cols), generator=gen, dtype=torch.float32)
    raise ValueError(f"projection kind {kind!r}: choose one of {', '.join(KINDS)}")


def _check_kind(kind):
    if kind not in KINDS:
        raise UserError(f"projection kind {kind!r}: choose one of {', '.join(KINDS)}")


def _dense_matrix(n: int, k: int, seed: int, kind: str) -> torch.Tensor:
    """The n x k dense JL matrix, made of row blocks each from its own derived seed."""
    rows = max(1, DENSE_BLOCK_ELEMENTS // k)
    return torch.cat([random_matrix(min(rows, n - start), k, derive_seed(seed, "block", i), kind)
                      for i, start in enumerate(range(0, n, rows))])


# ----------------------------------------------------------------------------- the interface


class Projector(ABC):
    """What the gradient engine's ProjectAccumulator calls: a seeded random map of per-example gradients, given
    layer by layer in the form each hook has, to proj_dim numbers, unbiased for inner products
    (E[<proj a, proj b>] = <a, b>), whose matrices are regenerated from its state, never stored (as TRAK's
    AbstractProjector). Each project_* returns one layer's sketch [B, k]; project() joins the layers' sketches
    into [B, proj_dim]. FactoredProjector is the implementation."""

    proj_dim: int
    seed: int
    kind: str

    @abstractmethod
    def project_dense(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """Explicit per-example gradients of one parameter [B, numel] (norm weights, biases, LoRA) -> [B, k]."""

    @abstractmethod
    def project_linear(self, name: str, out_grads: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """A Linear weight's G_b = sum_t out_grads[b, t] inputs[b, t]^T from its factors [B, T, out], [B, T, in]
        -> [B, k]."""

    @abstractmethod
    def project_embedding(self, name: str, out_grads: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The input embedding's sum_t e_{id_t} g_t^T from out_grads [B, T, d] at token_ids [B, T] -> [B, k]."""

    @abstractmethod
    def project(self, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every layer's sketch {name: [B, k]} -> [B, proj_dim], in a fixed layer order."""

    @abstractmethod
    def state_dict(self) -> dict:
        """JSON-able: enough to rebuild the identical projector (recorded beside the features)."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state: dict, device=None) -> "Projector":
        """The identical projector, from state_dict(); a state of another format or version is refused."""


# ----------------------------------------------------------------------------- dense JL


class DenseProjector:
    """A plain dense JL map R^n -> R^k: x -> x P / sqrt(k), P n x k with iid +-1 (or N(0,1)) entries: what
    FactoredProjector applies to a (1, n) layer, and a reference for flat vectors. Not a Projector: it maps one
    flat vector, not a model's layers.

    E[<proj a, proj b>] = <a, b>;  Var = (|a|^2|b|^2 + <a,b>^2 - 2 kappa sum_i a_i^2 b_i^2) / k
    (kappa = 1 Rademacher, 0 Gaussian). The matrix is generated on the CPU in row blocks (each from a seed
    derived from (seed, name, block)), kept on the device when it has at most DENSE_CACHE_ELEMENTS numbers
    and otherwise regenerated block by block at each call (slow for very large n: this is the reference for
    vectors of modest size, e.g. LESS-style LoRA features in benchmarks, not for a 7B model's full gradient).
    """

    def __init__(self, dim: int, proj_dim: int, seed: int = 0, device=None, dtype=torch.float32,
                 kind: str = "rademacher", name: str = ""):
        _check_kind(kind)
        if dim < 1 or proj_dim < 1:
            raise UserError(f"dense projection {dim} -> {proj_dim}: both must be >= 1")
        self.dim, self.proj_dim, self.seed, self.kind, self.name = int(dim), int(proj_dim), int(seed), kind, name
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def _seed(self) -> int:
        return derive_seed(self.seed, self.name, "dense")

    def matrix(self, device=None) -> torch.Tensor:
        """The unscaled n x k matrix (+-1 or N(0,1)), materialised."""
        device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        key = str(device)
        if key in self._cache:
            return self._cache[key]
        mat = _dense_matrix(self.dim, self.proj_dim, self._seed, self.kind).to(device=device, dtype=self.dtype)
        if self.dim * self.proj_dim <= DENSE_CACHE_ELEMENTS:
            self._cache[key] = mat
        return mat

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n] -> [B, k]."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"DenseProjector.project: want [B, {self.dim}], got {list(x.shape)}")
        device = self.device or x.device
        x = x.to(device=device, dtype=self.dtype)
        scale = 1.0 / math.sqrt(self.proj_dim)
        if self.dim * self.proj_dim <= DENSE_CACHE_ELEMENTS:
            return (x @ self.matrix(device)) * scale
        out = torch.zeros(x.shape[0], self.proj_dim, device=device, dtype=self.dtype)
        rows = max(1, DENSE_BLOCK_ELEMENTS // self.proj_dim)
        for i, start in enumerate(range(0, self.dim, rows)):
            block = random_matrix(min(rows, self.dim - start), self.proj_dim, derive_seed(self._seed, "block", i),
                                  self.kind).to(device=device, dtype=self.dtype)
            out += x[:, start:start + block.shape[0]] @ block
        return out * scale

    def state_dict(self) -> dict:
        return {"format": "safedata.DenseProjector", "version": VERSION, "dim": self.dim,
                "proj_dim": self.proj_dim, "seed": self.seed, "kind": self.kind, "name": self.name,
                "dtype": str(self.dtype).replace("torch.", "")}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "DenseProjector":
        if state.get("format") != "safedata.DenseProjector" or state.get("version") != VERSION:
            raise UserError(f"not a version-{VERSION} DenseProjector state: {state.get('format')} "
                            f"v{state.get('version')}")
        return cls(state["dim"], state["proj_dim"], state["seed"], device, getattr(torch, state["dtype"]),
                   state["kind"], state["name"])


# ----------------------------------------------------------------------------- allocation and layouts


def allocate_dims(sizes: dict[str, int], proj_dim: int) -> dict[str, int]:
    """Split proj_dim over layers in proportion to their sizes: each >= 1 and <= its size, sum exact.

    Layers whose share is below 1 get 1 (and leave the rest to the others, repeatedly); the rest get
    floor(share) plus one for the largest remainders (exact integer arithmetic; ties by name). The result
    depends only on the (name, size) pairs and proj_dim, not on dict order.
    """
    names = sorted(sizes)
    if not names:
        raise UserError("projection: no layers")
    if any(int(sizes[n]) < 1 for n in names):
        raise UserError(f"projection: empty layer(s) {[n for n in names if int(sizes[n]) < 1]}")
    total = sum(int(sizes[n]) for n in names)
    if proj_dim < len(names):
        raise UserError(f"--proj_dim {proj_dim} is below the number of projected parameter tensors "
                        f"({len(names)}): every tensor needs at least one dimension")
    if proj_dim > total:
        raise UserError(f"--proj_dim {proj_dim} exceeds the number of projected parameters ({total}): "
                        f"use at most {total} (= no projection)")
    dims: dict[str, int] = {}
    free = list(names)
    budget = proj_dim
    while True:  # share_l = budget * size_l / free_total; layers below 1 are fixed at 1
        free_total = sum(sizes[n] for n in free)
        small = [n for n in free if budget * sizes[n] < free_total]
        if not small:
            break
        for n in small:
            dims[n] = 1
        budget -= len(small)
        free = [n for n in free if n not in dims]
    if free:
        free_total = sum(sizes[n] for n in free)
        floors = {n: budget * sizes[n] // free_total for n in free}
        left = budget - sum(floors.values())
        by_remainder = sorted(free, key=lambda n: (-(budget * sizes[n] % free_total), n))
        for i, n in enumerate(by_remainder):
            dims[n] = floors[n] + (1 if i < left else 0)
    assert sum(dims.values()) == proj_dim and all(1 <= dims[n] <= sizes[n] for n in names)
    return {n: dims[n] for n in names}


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's k outputs are made (everything but the random numbers)."""

    rows: int            # out (vocab for an embedding; 1 for a dense parameter)
    cols: int            # in  (d for an embedding; n for a dense parameter)
    k: int
    mode: str            # "kron" | "dense" | "identity"
    k_out: int = 0       # kron: columns of P_out (== rows when out_identity)
    k_in: int = 0        # kron: columns of P_in  (== cols when in_identity)
    out_identity: bool = False
    in_identity: bool = False
    fill: str = "row"    # order in which the k kept entries are read from the k_out x k_in block


def plan_layer(rows: int, cols: int, k: int) -> LayerPlan:
    """The square-ish factorisation k_out * k_in >= k of one layer's budget (see the module docstring)."""
    if not 1 <= k <= rows * cols:
        raise ValueError(f"layer {rows}x{cols}: k={k} out of range")
    if k == rows * cols:
        return LayerPlan(rows, cols, k, "identity")
    if rows == 1:
        return LayerPlan(rows, cols, k, "dense")
    side = math.isqrt(k - 1) + 1                      # ceil(sqrt(k))
    if side >= rows:                                  # out side small: keep it exact
        return LayerPlan(rows, cols, k, "kron", rows, -(-k // rows), out_identity=True, fill="col")
    if side >= cols:                                  # in side small: keep it exact
        return LayerPlan(rows, cols, k, "kron", -(-k // cols), cols, in_identity=True, fill="row")
    k_in = -(-k // side)
    k_out = -(-k // k_in)                             # rows actually used by a row-major fill
    return LayerPlan(rows, cols, k, "kron", k_out, k_in)


def plan_selection(plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices into the row-major k_out x k_in block, the scale of each kept entry), float64."""
    r = torch.arange(plan.k)
    if plan.fill == "row":
        a, b = r // plan.k_in, r % plan.k_in
    else:
        a, b = r % plan.k_out, r // plan.k_out
    if plan.out_identity:
        counts = torch.bincount(a, minlength=plan.k_out).double()
        weight = counts[a].rsqrt()
    elif plan.in_identity:
        counts = torch.bincount(b, minlength=plan.k_in).double()
        weight = counts[b].rsqrt()
    else:
        weight = torch.full((plan.k,), 1.0 / math.sqrt(plan.k), dtype=torch.float64)
    return a * plan.k_in + b, weight


# ----------------------------------------------------------------------------- the factored projector


class FactoredProjector(Projector):
    """Per-layer Kronecker (linear, embedding) / dense (1 x n) sketches of per-example gradients.

    layer_shapes: {name: (out, in)} for Linear weights, (vocab, d) for embeddings, (1, n) for dense params.
    dims: {name: k}, summing to proj_dim (allocate_dims). plans: {name: LayerPlan}. order: sorted names.
    Inputs of any float dtype are cast to `dtype` (fp32 recommended; bf16 sketches lose ~3 digits).
    device=None: compute on the device of the inputs (matrices cached per device).
    """

    def __init__(self, layer_shapes: dict[str, tuple[int, int]], proj_dim: int, seed: int = 0, device=None,
                 dtype=torch.float32, kind: str = "rademacher"):
        shapes = {str(n): (int(s[0]), int(s[1])) for n, s in layer_shapes.items()}
        for name, shape in shapes.items():
            if len(layer_shapes[name]) != 2 or min(shape) < 1:
                raise UserError(f"projection: layer {name!r} has shape {tuple(layer_shapes[name])}; "
                                "want (out, in), (vocab, d) or (1, n)")
        dims = allocate_dims({n: r * c for n, (r, c) in shapes.items()}, int(proj_dim))
        self._setup(shapes, dims, seed, device, dtype, kind)

    def _setup(self, shapes, dims, seed, device, dtype, kind):
        _check_kind(kind)
        self.layer_shapes = {n: shapes[n] for n in sorted(shapes)}
        self.order = list(self.layer_shapes)
        self.dims = {n: int(dims[n]) for n in self.order}
        self.proj_dim = sum(self.dims.values())
        self.seed, self.kind, self.dtype = int(seed), kind, dtype
        self.device = torch.device(device) if device is not None else None
        self.plans = {n: plan_layer(*self.layer_shapes[n], self.dims[n]) for n in self.order}
        self.offsets, start = {}, 0
        for n in self.order:
            self.offsets[n] = (start, start + self.dims[n])
            start += self.dims[n]
        self._cache: dict[tuple[str, str], tuple] = {}
        self._dense: dict[str, DenseProjector] = {}

    def __repr__(self):
        return (f"FactoredProjector({len(self.order)} layers, proj_dim={self.proj_dim}, seed={self.seed}, "
                f"kind={self.kind})")

    # ------------------------------------------------------------------ matrices

    def _plan(self, name) -> LayerPlan:
        try:
            return self.plans[name]
        except KeyError:
            raise KeyError(f"projection: unknown layer {name!r}") from None

    def _device(self, tensor) -> torch.device:
        return self.device or tensor.device

    def _dense_projector(self, name) -> DenseProjector:
        if name not in self._dense:
            plan = self.plans[name]
            self._dense[name] = DenseProjector(plan.rows * plan.cols, plan.k, self.seed, self.device, self.dtype,
                                               self.kind, name=name)
        return self._dense[name]

    def _kron(self, name, device) -> tuple:
        """(P_out or None, P_in or None, flat indices or None, scales) on `device`; None = identity / all."""
        key = (name, str(device))
        if key not in self._cache:
            plan = self.plans[name]
            p_out = None if plan.out_identity else random_matrix(
                plan.rows, plan.k_out, derive_seed(self.seed, name, "out"), self.kind)
            p_in = None if plan.in_identity else random_matrix(
                plan.cols, plan.k_in, derive_seed(self.seed, name, "in"), self.kind)
            index, weight = plan_selection(plan)
            full = plan.k == plan.k_out * plan.k_in and plan.fill == "row"
            move = dict(device=device, dtype=self.dtype)
            self._cache[key] = (None if p_out is None else p_out.to(**move), None if p_in is None else p_in.to(**move),
                                None if full else index.to(device), weight.to(**move))
        return self._cache[key]

    # ------------------------------------------------------------------ projections

    def _finish(self, name, z: torch.Tensor) -> torch.Tensor:
        """[B, k_out, k_in] block -> [B, k]: keep the layer's entries, scaled."""
        _, _, index, weight = self._kron(name, z.device)
        flat = z.reshape(z.shape[0], -1)
        if index is not None:
            flat = flat[:, index]
        return flat * weight

    def project_linear(self, name, out_grads: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Sketch of G_b = sum_t out_grads[b, t] inputs[b, t]^T for each example b: [B, T, out], [B, T, in] -> [B, k]."""
        plan = self._plan(name)
        if out_grads.dim() == 2:
            out_grads, inputs = out_grads.unsqueeze(1), inputs.unsqueeze(1)
        if out_grads.dim() != 3 or inputs.dim() != 3 or out_grads.shape[:2] != inputs.shape[:2] \
                or out_grads.shape[2] != plan.rows or inputs.shape[2] != plan.cols:
            raise ValueError(f"project_linear({name!r}): want [B, T, {plan.rows}] and [B, T, {plan.cols}], "
                             f"got {list(out_grads.shape)} and {list(inputs.shape)}")
        device = self._device(out_grads)
        g = out_grads.to(device=device, dtype=self.dtype)
        x = inputs.to(device=device, dtype=self.dtype)
        if plan.mode != "kron":
            grad = (g.transpose(1, 2) @ x).reshape(g.shape[0], -1)
            return self._flat(name, plan, grad)
        p_out, p_in, _, _ = self._kron(name, device)
        u = g if p_out is None else g @ p_out          # [B, T, k_out]
        v = x if p_in is None else x @ p_in            # [B, T, k_in]
        return self._finish(name, u.transpose(1, 2) @ v)

    def project_embedding(self, name, out_grads: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Sketch of sum_t e_{id_t} g_t^T (vocab x d): out_grads [B, T, d], token_ids [B, T] -> [B, k]."""
        plan = self._plan(name)
        if out_grads.dim() != 3 or token_ids.shape != out_grads.shape[:2] or out_grads.shape[2] != plan.cols:
            raise ValueError(f"project_embedding({name!r}): want out_grads [B, T, {plan.cols}] and token_ids "
                             f"[B, T], got {list(out_grads.shape)} and {list(token_ids.shape)}")
        device = self._device(out_grads)
        ids = token_ids.to(device=device, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= plan.rows):
            raise ValueError(f"project_embedding({name!r}): token ids must lie in [0, {plan.rows}), "
                             f"got [{int(ids.min())}, {int(ids.max())}]")
        g = out_grads.to(device=device, dtype=self.dtype)
        if plan.mode != "kron" or plan.out_identity:   # small vocab: the explicit one-hot route
            one_hot = torch.nn.functional.one_hot(ids, plan.rows).to(self.dtype)
            return self.project_linear(name, one_hot, g)
        p_out, p_in, _, _ = self._kron(name, device)
        u = p_out[ids]                                 # [B, T, k_out]: rows of P_out picked by token id
        v = g if p_in is None else g @ p_in
        return self._finish(name, u.transpose(1, 2) @ v)

    def _flat(self, name, plan, grad):
        if plan.mode == "identity":
            return grad
        if plan.mode == "dense":
            return self._dense_projector(name).project(grad)
        p_out, p_in, _, _ = self._kron(name, grad.device)
        z = grad.reshape(grad.shape[0], plan.rows, plan.cols)
        if p_out is not None:
            z = p_out.T @ z
        if p_in is not None:
            z = z @ p_in
        return self._finish(name, z)

    def project_dense(self, name, grads: torch.Tensor) -> torch.Tensor:
        """Sketch of explicit per-example gradients [B, n] (n = out*in, row-major; (1, n) layers) -> [B, k].

        For a (1, n) layer this is the plain JL map; for any other layer the same map as project_linear,
        applied to the materialised gradient (affordable only for small layers; used by tests).
        """
        plan = self._plan(name)
        n = plan.rows * plan.cols
        if grads.dim() == 3:
            grads = grads.reshape(grads.shape[0], -1)
        if grads.dim() != 2 or grads.shape[1] != n:
            raise ValueError(f"project_dense({name!r}): want [B, {n}], got {list(grads.shape)}")
        return self._flat(name, plan, grads.to(device=self._device(grads), dtype=self.dtype))

    def project(self, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-layer sketches in `self.order` (sorted names) -> [B, proj_dim].

        Each value is either the layer's sketch [B, dims[name]] (from project_linear / project_embedding /
        project_dense) or, for a small layer, its explicit flattened gradient [B, out*in], which is projected
        here (the two coincide for an identity layer). Every layer must be present.
        """
        missing = [n for n in self.order if n not in per_layer]
        unknown = [n for n in per_layer if n not in self.plans]
        if missing or unknown:
            raise KeyError(f"project: missing layers {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unknown layers {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
        parts = []
        for n in self.order:
            value = per_layer[n]
            if value.dim() != 2:
                raise ValueError(f"project: layer {n!r} value has shape {list(value.shape)}, want 2-D")
            if value.shape[1] != self.dims[n]:
                value = self.project_dense(n, value)
            parts.append(value.to(dtype=self.dtype))
        device = parts[0].device
        return torch.cat([p.to(device) for p in parts], dim=1)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """JSON-able: enough to rebuild the identical projector (matrices are regenerated, never stored)."""
        return {"format": FORMAT, "version": VERSION, "seed": self.seed, "kind": self.kind,
                "proj_dim": self.proj_dim, "dtype": str(self.dtype).replace("torch.", ""), "order": list(self.order),
                "layer_shapes": {n: list(s) for n, s in self.layer_shapes.items()},
                "dims": dict(self.dims), "plans": {n: asdict(p) for n, p in self.plans.items()}}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "FactoredProjector":
        """Rebuild from state_dict(); the stored dims are used as they are (not re-allocated)."""
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise UserError(f"projection state is {state.get('format')} v{state.get('version')}; this code reads "
                            f"{FORMAT} v{VERSION} (features made by another version cannot be extended)")
        self = cls.__new__(cls)
        shapes = {n: (int(s[0]), int(s[1])) for n, s in state["layer_shapes"].items()}
        self._setup(shapes, state["dims"], state["seed"], device, getattr(torch, state.get("dtype", "float32")),
                    state["kind"])
        if state.get("proj_dim", self.proj_dim) != self.proj_dim or state.get("order", self.order) != self.order:
            raise UserError("projection state is inconsistent: dims do not sum to proj_dim or order differs")
        stored = state.get("plans")
        if stored is not None and any(LayerPlan(**stored[n]) != self.plans[n] for n in self.order):
            raise UserError("projection state was made by a different layout rule; cannot rebuild it identically")
        return self
