"""What the engine hands an accumulator, and nothing more: the batch's settings once (`BatchContext`), each Linear
layer's input (`LayerInput`), and the `Accumulator` interface the engine's hooks call. An accumulator never
reads the engine, and the engine asks an accumulator one thing only: the batch's result, which `end()` returns
and `GradientEngine.run` hands back (`Products` for the scores). Nothing is read off either after a run.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from .numerics import TEMP_ELEMENTS, Numerics
from .sites import Site


class LayerInput:
    """A Linear layer's input, shared by the sites that read it (q/k/v; gate/up): its operand in the compute
    dtype and its Gram matrix are made once, on first use, for all of them."""

    __slots__ = ("raw", "users", "x", "num", "_operand", "_gram")

    def __init__(self, raw: torch.Tensor, num: Numerics):
        self.raw, self.users, self.x, self.num, self._operand, self._gram = raw, 0, None, num, None, None

    def operand(self) -> torch.Tensor:
        """x [B, T, n] as it enters products (numerics.Numerics.operand)."""
        if self._operand is None:
            self._operand = self.num.operand(self.x)
        return self._operand

    def gram(self) -> torch.Tensor:
        """[B, T, T] = x x^T per example (the ghost norm's input half)."""
        if self._gram is None:
            x = self.operand()
            self._gram = self.num.bmm(x, x.transpose(1, 2))
        return self._gram

    def release(self) -> None:
        self.raw = self.x = self._operand = self._gram = None


class Workspace:
    """Per-example weight gradients [b, out, in] of a Linear layer, in the numerics' operand dtype (the compute
    dtype, or bf16 for a bf16 model on CPU: one bf16 GEMM, see numerics.py); off CUDA written into one reused
    buffer (a fresh allocation of this size costs page faults on every layer)."""

    def __init__(self, num: Numerics, device: torch.device):
        self.num, self.device, self._buffer = num, device, None

    def per_example_grads(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.num.fast or self.device.type == "cuda":
            return self.num.bmm(g.transpose(1, 2), x)
        b, m, n = g.shape[0], g.shape[-1], x.shape[-1]
        size = b * m * n
        dtype = self.num.operand_dtype
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = torch.empty(max(size, min(TEMP_ELEMENTS, 4 * size)), dtype=dtype, device=self.device)
        out = self._buffer[:size].view(b, m, n)
        return torch.bmm(g.transpose(1, 2).to(dtype), x.to(dtype), out=out)


@dataclass(frozen=True)
class BatchContext:
    """One batch as an accumulator sees it: its token ids and the engine's settings that decide how a layer's
    products are computed (`path`: auto, ghost or materialise; `beta`: the device's memory cost per element, for
    the auto path's cost model; `tied`: the weight the input embedding and the LM head share, if any)."""

    token_ids: torch.Tensor          # [B, T]
    num: Numerics
    device: torch.device
    path: str
    beta: float
    tied: str | None
    vocab: int
    workspace: Workspace

    @property
    def batch_size(self) -> int:
        return self.token_ids.shape[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.num.compute_dtype


@dataclass(frozen=True)
class Products:
    """One batch's per-example products, in the compute dtype: inner [B, J] = <G_i, T_j>, sqnorm [B] = ||G_i||^2."""

    inner: torch.Tensor
    sqnorm: torch.Tensor


R = TypeVar("R")


class Accumulator(ABC, Generic[R]):
    """What the engine's hooks feed, for one batch: begin, then each tracked parameter's per-example gradient in
    the form that is cheapest to hand over, then end, which returns the batch's result (R)."""

    def begin(self, batch: BatchContext) -> None:
        self.batch = batch

    def end(self) -> R | None:
        """The batch's result, handed back by GradientEngine.run (None: an accumulator that keeps nothing)."""
        return None

    @abstractmethod
    def dense(self, name: str, v: torch.Tensor) -> None:
        """v [B, numel]: the per-example gradient of a small parameter (norm weight, bias, LoRA matrix)."""

    @abstractmethod
    def linear(self, site: Site, layer_input: LayerInput, g: torch.Tensor, mask: torch.Tensor) -> None:
        """A Linear weight's per-example gradient as its factors: g [B, T, out] (output-gradients) and
        layer_input.x [B, T, in]; mask [B, T] the positions that count."""

    @abstractmethod
    def embedding(self, site: Site, token_ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> None:
        """The input embedding's per-example gradient as g [B, T, d] at token_ids [B, T] (rows, summed per id)."""
