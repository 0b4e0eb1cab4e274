"""Products in a fixed accumulation dtype, and the cost model that picks how each layer is computed.

Numerics: every product is accumulated in fp32 (fp64 for fp64 models), and every sum of products after it too.
Low-precision (bf16/fp16) operands: on CUDA they go to fp32-output matmuls (torch.mm(..., out_dtype=float32));
on CPU a bf16 pair goes to one bf16 GEMM (oneDNN accumulates in fp32 inside it) whose output is rounded to bf16
once and upcast before anything adds it up: torch's CPU backend has no bf16-in/fp32-out matmul, and upcasting
the operands instead costs 2.5x the bf16 GEMM's time (bench/README.md, "Real model"). That one rounding is
relative 2^-8 per product entry, far below what the bf16 model's own activations carry (tests/test_gradients.py
measures both). Other pairs are upcast.
linear_costs: per-example multiply-adds of the ways to get a Linear layer's ||G||^2 and <G, T_j>.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

TEMP_ELEMENTS = 1 << 26          # cap on one temporary product (numbers)


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
    """Matmuls accumulated in the compute dtype (fp32, or fp64 for fp64 models) and returned in it.

    fast: low-precision operands go to fp32-output matmuls (CUDA); low_out: a bf16 pair goes to a bf16 GEMM whose
    output is rounded once and upcast (CPU, see the module's docstring). Either way the model's low-precision
    tensors enter products as they are (operand), and large stored operands (the target bank's dense rows, the
    per-example gradients) are kept in `operand_dtype`."""

    def __init__(self, device: torch.device, model_dtype: torch.dtype):
        self.model_dtype = model_dtype
        self.compute_dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
        low = model_dtype in (torch.bfloat16, torch.float16)
        self.fast = low and device.type == "cuda" and _out_dtype_supported(device, model_dtype)
        self.low_out = model_dtype == torch.bfloat16 and device.type == "cpu"

    @property
    def operand_dtype(self) -> torch.dtype:
        return self.model_dtype if self.low_out else self.compute_dtype

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """The dtype a tensor enters products in: the model's low precision where fp32-output matmuls exist (or
        the bf16 GEMM, low_out), else the compute dtype."""
        if (self.fast or self.low_out) and t.dtype == self.model_dtype:
            return t
        return t if t.dtype == self.compute_dtype else t.to(self.compute_dtype)

    def _low(self, a, b):
        return self.fast and a.dtype == b.dtype and a.dtype != self.compute_dtype

    def _give_up(self, err):
        log.warning("fp32-output low-precision matmul failed (%s); upcasting operands from now on", err)
        self.fast = False

    def _fp32_out(self, op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self._low(a, b):
            try:
                return op(a, b, out_dtype=self.compute_dtype)
            except torch.OutOfMemoryError:
                raise       # never retried with fp32 copies (more memory): the stage stops with a clear message
            except RuntimeError as err:
                self._give_up(err)
        if self.low_out and a.dtype == b.dtype == self.model_dtype:
            return op(a, b).to(self.compute_dtype)
        return op(a.to(self.compute_dtype), b.to(self.compute_dtype))

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._fp32_out(torch.mm, a, b)

    def bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._fp32_out(torch.bmm, a, b)


# Memory traffic in multiply-add equivalents per number read or written (the device's compute/bandwidth
# ratio, measured on the development CPU; from the datasheet for H100/H200 class GPUs): the cost model
# below weighs a materialised per-example gradient's passes over memory against the products it saves.
MEMORY_COST = {"cpu": 16.0, "cuda": 256.0}


def memory_cost(device: torch.device) -> float:
    return MEMORY_COST.get(device.type, 64.0)


def linear_costs(T: int, n: int, m: int, K: int, n_dense_targets: int, full: bool, beta: float) -> dict:
    """Per-example cost (multiply-adds) of each way to get ||G||^2 and <G, T_j> for a Linear [m, n]."""
    nm = n * m
    costs = {"ghost": T * T * (n + m) + K * T * (n + m) + n_dense_targets * T * nm,
             "materialise": T * nm + beta * nm * (2 + (n_dense_targets > 0))
             + (min(K * nm + beta * nm, K * T * (n + m)) if K else 0)}
    if full:
        costs["full"] = T * nm + 3 * beta * nm
    return costs


DENSE_COPY_T = 128               # the batch length a layer's form is chosen for
DENSE_COPY_BYTES = 1 << 30       # extra memory for dense copies of factored targets, besides the model's size


@dataclass(frozen=True)
class FactoredLayer:
    """A Linear weight [m, n] as the target bank holds it: K factor pairs over all targets, n_dense_targets dense
    targets, and how many targets are factored there (each needs an m x n dense copy)."""
    name: str
    m: int
    n: int
    K: int
    n_dense_targets: int
    n_factored: int


def choose_dense_copies(layers: list[FactoredLayer], beta: float, budget: int, element_size: int) -> list[tuple]:
    """(name, bytes) of the layers that get a dense copy of their factored targets: those where (at a typical
    batch length) materialising each example's gradient and one GEMM against every target beats factor
    products, greedily by the saving per byte, within `budget` bytes. The target bank makes these copies and
    the memory plan counts them: both call this."""
    candidates = []
    for layer in layers:
        now = linear_costs(DENSE_COPY_T, layer.n, layer.m, layer.K, layer.n_dense_targets, False, beta)
        after = linear_costs(DENSE_COPY_T, layer.n, layer.m, layer.K, layer.n_dense_targets, True, beta)["full"]
        saving = min(now.values()) - after
        nbytes = layer.n_factored * layer.n * layer.m * element_size
        if saving > 0:
            candidates.append((saving / nbytes, layer.name, nbytes))
    chosen = []
    for _, name, nbytes in sorted(candidates, reverse=True):
        if nbytes <= budget:
            budget -= nbytes
            chosen.append((name, nbytes))
    return chosen


def dense_copy_budget(model_bytes: int) -> int:
    return DENSE_COPY_BYTES + model_bytes


def chunks(total: int, per_item: int):
    step = max(1, TEMP_ELEMENTS // max(1, per_item))
    return [(s, min(total, s + step)) for s in range(0, total, step)]


def segment_sum(values: torch.Tensor, index: torch.Tensor, n: int, presorted: bool = False) -> torch.Tensor:
    """out[r] = the sum of values[i] over index[i] == r (r < n), added in input order within each r.

    What index_add_ computes, but in a fixed order on every device: a stable sort of the index, then
    torch.segment_reduce, whose CUDA kernel sums each segment in one thread (index_add_'s CUDA kernel adds
    atomically, in whatever order the threads arrive, so its last bits change from run to run).
    presorted: the index is already non-decreasing (no sort)."""
    if not presorted:
        order = torch.argsort(index, stable=True)
        index, values = index[order], values[order]
    lengths = torch.bincount(index, minlength=n)
    return torch.segment_reduce(values, "sum", lengths=lengths, axis=0)
