"""How one layer's part of ||G_i||^2 and <G_i, T_j> is computed: one strategy object per way.

A Linear weight is computed one of three ways, chosen per layer and batch by the cost model (choose_linear):
  GhostLinear          from the factors g, x alone (Gram matrices, factor products): never a per-example gradient;
  MaterialisedLinear   each example's gradient [out, in] formed in a reused buffer, then norms and GEMMs against
                       the dense targets (its `full` form: against the bank's dense copy of every target).
The other parameters have one way each:
  DenseProducts        a small parameter (norm weight, bias, LoRA matrix) handed over as explicit vectors;
  EmbeddingRows        the input embedding: the gradient's rows, summed per (example, token id);
  TiedHead             a weight the input embedding and the LM head share: the head's gradient against a target's
                       embedding rows, the embedding's against a target's head factors, and the cross term
                       2 <E_i, H_i> of ||E_i + H_i||^2, whose head half is kept from the head's hook for the
                       embedding's (backward must reach the head first: asserted).
Each adds into a batch's Sums; none keeps anything from one batch to the next.
"""
from __future__ import annotations

import torch

from .bank import _ParamBank
from .context import BatchContext, LayerInput
from .numerics import chunks, linear_costs, segment_sum


class Sums:
    """One batch's running products, added to layer by layer: sq [B] = ||G_i||^2, inner [B, J] = <G_i, T_j>,
    both in the compute dtype."""

    __slots__ = ("sq", "inner", "num", "compute_dtype", "workspace")

    def __init__(self, batch: BatchContext, n_targets: int):
        self.num, self.compute_dtype, self.workspace = batch.num, batch.compute_dtype, batch.workspace
        self.sq = torch.zeros(batch.batch_size, dtype=self.compute_dtype, device=batch.device)
        self.inner = torch.zeros(batch.batch_size, n_targets, dtype=self.compute_dtype, device=batch.device)


# ----------------------------------------------------------------------------- small parameters


class DenseProducts:
    """v [B, numel] (in the compute dtype): the norm by a sum of squares, the dense targets by one GEMM."""

    def add(self, sums: Sums, v: torch.Tensor, targets: _ParamBank) -> None:
        sums.sq += (v * v).sum(1)
        if targets.n_dense_targets:
            sums.inner[:, targets.dense_cols] += sums.num.mm(v, targets.dense_mat.T)


# ----------------------------------------------------------------------------- Linear weights


def factored_by_activations(sums: Sums, x: torch.Tensor, g: torch.Tensor, targets: _ParamBank) -> torch.Tensor:
    """[B, J]: sum_k W[k, j] sum_t (g_t . G_k)(x_t . X_k), the factored targets against the factors g, x."""
    num = sums.num
    B, T, n = x.shape
    m = g.shape[-1]
    out = torch.zeros(B, sums.inner.shape[1], dtype=sums.compute_dtype, device=x.device)
    g2, x2 = g.reshape(B * T, m), x.reshape(B * T, n)
    for k0, k1 in chunks(targets.K, 2 * B * T):
        P = num.mm(g2, targets.G[k0:k1].T).view(B, T, -1)
        Q = num.mm(x2, targets.X[k0:k1].T).view(B, T, -1)
        out += (P * Q).sum(1) @ targets.W[k0:k1]
    return out


def _dense_by_activations(sums: Sums, x: torch.Tensor, g: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """[B]: sum_t g_t^T D x_t, one dense target D [m, n] against the factors g, x."""
    num = sums.num
    B, T, n = x.shape
    m = g.shape[-1]
    out = torch.zeros(B * T, dtype=sums.compute_dtype, device=x.device)
    x2, g2 = x.reshape(B * T, n), g.reshape(B * T, m)
    for r0, r1 in chunks(B * T, m):
        y = num.mm(x2[r0:r1], dense.T)
        out[r0:r1] = (y * g2[r0:r1].to(sums.compute_dtype)).sum(1)
    return out.view(B, T).sum(1)


class GhostLinear:
    """||G_i||^2 = sum_{s,t} (g_s . g_t)(x_s . x_t), and every target against the factors: no per-example
    gradient is formed (cheap for short sequences of wide layers)."""

    name = "ghost"

    def add(self, sums: Sums, layer_input: LayerInput, x: torch.Tensor, g: torch.Tensor,
            targets: _ParamBank) -> None:
        m, n = g.shape[-1], x.shape[-1]
        gg = sums.num.bmm(g, g.transpose(1, 2))
        sums.sq += (gg * layer_input.gram()).sum((1, 2))
        del gg
        if targets.K:
            sums.inner += factored_by_activations(sums, x, g, targets)
        for j, dense in targets.dense:
            sums.inner[:, j] += _dense_by_activations(sums, x, g, dense.view(m, n))


class MaterialisedLinear:
    """Each example's gradient of the layer, one chunk of examples at a time (in the batch's reused buffer):
    ||G_i||^2 from it, <G_i, T_j> by one GEMM against the dense targets (full: against the bank's dense copy of
    every target of the layer); factored targets either against the formed gradient or by factor products,
    whichever costs less."""

    def __init__(self, full: bool):
        self.full = full
        self.name = "full" if full else "materialise"

    def add(self, sums: Sums, layer_input: LayerInput, x: torch.Tensor, g: torch.Tensor,
            targets: _ParamBank) -> None:
        B, T, n = x.shape
        m = g.shape[-1]
        full = self.full
        K = 0 if full else targets.K
        mat, cols = (targets.full_mat, targets.full_cols) if full else (targets.dense_mat, targets.dense_cols)
        via_grad = K and K * n * m < K * T * (n + m)
        for b0, b1 in chunks(B, m * n):
            grads = sums.workspace.per_example_grads(g[b0:b1], x[b0:b1])          # [b, out, in]
            flat = grads.view(b1 - b0, -1)
            sums.sq[b0:b1] += torch.linalg.vector_norm(flat, dim=1, dtype=sums.compute_dtype).square()
            if mat is not None:
                sums.inner[b0:b1, cols] += sums.num.mm(flat, mat.T)
            if K and via_grad:
                Gc = targets.G.to(sums.compute_dtype)
                for k0, k1 in chunks(K, (b1 - b0) * m):
                    gx = sums.num.mm(grads.view(-1, n), targets.X[k0:k1].T).view(b1 - b0, m, -1)  # [b, out, k]
                    sums.inner[b0:b1] += (gx * Gc[k0:k1].T[None]).sum(1) @ targets.W[k0:k1]
            elif K:
                sums.inner[b0:b1] += factored_by_activations(sums, x[b0:b1], g[b0:b1], targets)
            del grads, flat


GHOST, MATERIALISED, FULL = GhostLinear(), MaterialisedLinear(full=False), MaterialisedLinear(full=True)
LINEAR_WAYS = {way.name: way for way in (GHOST, MATERIALISED, FULL)}


def choose_linear(path: str, beta: float, T: int, n: int, m: int,
                  targets: _ParamBank) -> GhostLinear | MaterialisedLinear:
    """The way a Linear weight [m, n] is computed at batch length T: the one `path` forces (ghost; materialise,
    in its full form where the bank has a dense copy), or (auto) the cheapest by numerics.linear_costs."""
    full = targets.full_mat is not None
    if path == "ghost":
        return GHOST
    if path == "materialise":
        return FULL if full else MATERIALISED
    costs = linear_costs(T, n, m, targets.K, targets.n_dense_targets, full, beta)
    return LINEAR_WAYS[min(costs, key=costs.get)]


# ----------------------------------------------------------------------------- the input embedding


class EmbeddingRows:
    """Rows of the per-example gradient by (example, token id), summed exactly; the norm from them, and the
    targets' embedding rows and dense parts against them."""

    def add(self, sums: Sums, token_ids: torch.Tensor, g: torch.Tensor, mask: torch.Tensor, vocab: int,
            targets: _ParamBank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [U, d], their example ub [U] (sorted), their token id uid [U])."""
        B, T, d = g.shape
        owner = torch.arange(B, device=g.device)[:, None].expand(B, T)[mask]
        key = owner * vocab + token_ids[mask]
        uniq, inv = torch.unique(key, return_inverse=True)
        rows = segment_sum(g[mask].to(sums.compute_dtype), inv, uniq.numel())
        ub, uid = uniq // vocab, uniq % vocab           # ub is sorted (torch.unique sorts the keys)
        sums.sq += segment_sum((rows * rows).sum(1), ub, B, presorted=True)
        for j, lookup, ids, val in targets.rows:
            li = lookup[uid]
            ok = li >= 0
            sums.inner[:, j] += segment_sum((rows[ok] * val[li[ok]]).sum(1), ub[ok], B, presorted=True)
        for j, dense in targets.dense:
            sums.inner[:, j] += segment_sum((rows * dense.view(vocab, d)[uid]).sum(1), ub, B, presorted=True)
        return rows, ub, uid


# ----------------------------------------------------------------------------- a tied embedding and LM head

HEAD_FIRST = ("tied embedding: backward reached the input embedding before the LM head (or never reached the "
              "head); the cross term 2 <E_i, H_i> of ||E_i + H_i||^2 needs the head's factors first, so this "
              "model's backward order is not supported")


class TiedHead:
    """The weight W the input embedding and the LM head share: G_i = E_i + H_i (embedding part E_i, head part H_i),
    so ||G_i||^2 = ||E_i||^2 + ||H_i||^2 + 2 <E_i, H_i> and each target's other form meets each part.

    One per batch: the head's hook keeps its factors (keep_head), the embedding's hook uses them for the cross
    term (add_cross_term). That relies on backward reaching the LM head (the loss's last layer) before the
    input embedding (its first); a model that ran them the other way would lose the cross term silently, so
    either hook asserts the order (HEAD_FIRST), and so does finish() at the end of the batch."""

    def __init__(self, token_ids: torch.Tensor):
        self.token_ids = token_ids
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None
        self._state = "waiting for the head"

    @staticmethod
    def head_against_rows(sums: Sums, x: torch.Tensor, g: torch.Tensor, targets: _ParamBank) -> None:
        """The head's gradient sum_t g_t x_t^T against each target's embedding rows (W[ids] = val)."""
        B, T, n = x.shape
        for j, lookup, ids, val in targets.rows:
            hr = sums.num.mm(x.reshape(B * T, n), val.T).view(B, T, -1)
            sums.inner[:, j] += (hr * g[:, :, ids].to(sums.compute_dtype)).sum((1, 2))

    @staticmethod
    def embedding_against_head_factors(sums: Sums, rows: torch.Tensor, ub: torch.Tensor, uid: torch.Tensor,
                                       targets: _ParamBank) -> None:
        """The embedding's rows against each target's LM-head factors (G_k at those token ids, X_k)."""
        if not targets.K:
            return
        num = sums.num
        B = sums.sq.shape[0]
        part = torch.zeros(B, sums.inner.shape[1], dtype=sums.compute_dtype, device=rows.device)
        for k0, k1 in chunks(targets.K, rows.shape[0]):
            a = num.mm(num.operand(rows), targets.X[k0:k1].T)                    # [U, k]
            sel_g = targets.G[k0:k1][:, uid].T.to(sums.compute_dtype)            # [U, k]
            part += segment_sum((a * sel_g) @ targets.W[k0:k1], ub, B, presorted=True)
        sums.inner += part

    def keep_head(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """From the head's hook: x [B, S, n] (its inputs) and g at the embedding's token ids [B, S, T]."""
        if self._state != "waiting for the head":
            raise AssertionError(f"{HEAD_FIRST} (the head's hook ran twice in one batch)")
        B, S = x.shape[:2]
        ids = self.token_ids
        self._head = (x, g.gather(2, ids[:, None, :].expand(B, S, ids.shape[1])))
        self._state = "head kept"

    def add_cross_term(self, sums: Sums, g: torch.Tensor) -> None:
        """From the embedding's hook (g [B, T, d]): sq += 2 <E_i, H_i> = 2 sum_{t,s} (g_t . x_s) g^head_s[id_t]."""
        if self._state != "head kept":
            raise AssertionError(HEAD_FIRST)
        hx, z = self._head
        num = sums.num
        a = num.bmm(num.operand(g), hx.transpose(1, 2))              # [B, T, S]: g_t . h_s
        sums.sq += 2 * (a * z.transpose(1, 2).to(sums.compute_dtype)).sum((1, 2))
        self._head = None
        self._state = "done"

    def finish(self) -> None:
        """At the end of the batch: both halves of the cross term met."""
        if self._state != "done":
            raise AssertionError(f"{HEAD_FIRST} (at the end of the batch: {self._state})")


DENSE, EMBEDDING = DenseProducts(), EmbeddingRows()
