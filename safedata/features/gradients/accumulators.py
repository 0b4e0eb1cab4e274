"""Accumulators: what the engine's hooks do with each layer's inputs and output-grads.

ScoreAccumulator: ||G_i||^2 and <G_i, T_j> per example (the scores, and Self-Inf);
CaptureAccumulator: the same, plus each anchor's factors / rows / dense parts (to build a target);
ProjectAccumulator: the per-example gradients' random projection (projection.py).
Each implements context.Accumulator: begin(batch) with the batch's BatchContext, dense(name, v),
linear(site, layer_input, g, mask), embedding(site, token_ids, g, mask), end(); none reads the engine.
"""
from __future__ import annotations

import torch

from .context import Accumulator, BatchContext
from .numerics import chunks, linear_costs, segment_sum
from .bank import TargetBank
from .targets import ParamTarget


class ScoreAccumulator(Accumulator):
    """Per batch: sqnorm [B] = ||G_i||^2 and inner [B, J] = <G_i, T_j>, layer by layer in the hooks."""

    def __init__(self, bank: TargetBank | None = None):
        self.bank = bank
        self.n_targets = bank.n if bank is not None else 0

    def begin(self, batch: BatchContext) -> None:
        super().begin(batch)
        self.num, self.compute_dtype = batch.num, batch.compute_dtype
        B = batch.batch_size
        self.sq = torch.zeros(B, dtype=self.compute_dtype, device=batch.device)
        self.inner = torch.zeros(B, self.n_targets, dtype=self.compute_dtype, device=batch.device)
        self._stash = None

    def end(self):
        self._stash = None

    def _param(self, name):
        return self.bank.get(name) if self.bank is not None else None

    # -------------------------------------------------------------- dense (norms, biases, LoRA)

    def dense(self, name, v):
        v = v.to(self.compute_dtype)
        self.sq += (v * v).sum(1)
        param_bank = self._param(name)
        if param_bank is not None and param_bank.n_dense_targets:
            self.inner[:, param_bank.dense_cols] += self.num.mm(v, param_bank.dense_mat.T)
        self.after_dense(name, v)

    def after_dense(self, name, v):
        pass

    # -------------------------------------------------------------- linear

    def linear(self, site, layer_input, g, mask):
        num, batch = self.num, self.batch
        x = layer_input.operand()
        g_orig, g = g, num.operand(g)
        B, T, n = x.shape
        m = g.shape[-1]
        param_bank = self._param(site.weight)
        K = param_bank.K if param_bank is not None else 0
        n_dense_targets = param_bank.n_dense_targets if param_bank is not None else 0
        full = param_bank is not None and param_bank.full_mat is not None
        if batch.path == "ghost":
            way = "ghost"
        elif batch.path == "materialise":
            way = "full" if full else "materialise"
        else:
            costs = linear_costs(T, n, m, K, n_dense_targets, full, batch.beta)
            way = min(costs, key=costs.get)
        if way != "ghost":
            self._linear_materialised(x, g, param_bank, T, way == "full")
        else:
            gg = num.bmm(g, g.transpose(1, 2))
            self.sq += (gg * layer_input.gram()).sum((1, 2))
            del gg
            if param_bank is not None:
                if K:
                    self.inner += self._factored_by_activations(x, g, param_bank)
                for j, D_ in param_bank.dense:
                    self.inner[:, j] += self._dense_by_activations(x, g, D_.view(m, n))
        if param_bank is not None:
            for j, lookup, ids, val in param_bank.rows:        # a tied LM head against the embedding rows of a target
                hr = num.mm(x.reshape(B * T, n), val.T).view(B, T, -1)
                self.inner[:, j] += (hr * g[:, :, ids].to(self.compute_dtype)).sum((1, 2))
        if site.head and batch.tied == site.weight:
            # keep what the embedding's hook needs for the cross term 2<E_i, H_i>
            ids = batch.token_ids
            tok = ids[:, None, :].expand(B, T, ids.shape[1])
            self._stash = (x, g.gather(2, tok))
        self.after_linear(site, layer_input, g_orig, mask)

    def after_linear(self, site, layer_input, g, mask):
        pass

    def _factored_by_activations(self, x, g, param_bank):
        num = self.num
        B, T, n = x.shape
        m = g.shape[-1]
        out = torch.zeros(B, self.n_targets, dtype=self.compute_dtype, device=x.device)
        g2, x2 = g.reshape(B * T, m), x.reshape(B * T, n)
        for k0, k1 in chunks(param_bank.K, 2 * B * T):
            P = num.mm(g2, param_bank.G[k0:k1].T).view(B, T, -1)
            Q = num.mm(x2, param_bank.X[k0:k1].T).view(B, T, -1)
            out += (P * Q).sum(1) @ param_bank.W[k0:k1]
        return out

    def _dense_by_activations(self, x, g, D_):
        num = self.num
        B, T, n = x.shape
        m = g.shape[-1]
        out = torch.zeros(B * T, dtype=self.compute_dtype, device=x.device)
        x2, g2 = x.reshape(B * T, n), g.reshape(B * T, m)
        for r0, r1 in chunks(B * T, m):
            y = num.mm(x2[r0:r1], D_.T)
            out[r0:r1] = (y * g2[r0:r1].to(self.compute_dtype)).sum(1)
        return out.view(B, T).sum(1)

    def _linear_materialised(self, x, g, param_bank, T, full=False):
        """Each example's gradient of the layer, one chunk of examples at a time (in a reused buffer):
        ||G_i||^2 from it, <G_i, T_j> by one GEMM against the dense targets (all of them with `full`)."""
        B, _, n = x.shape
        m = g.shape[-1]
        K = param_bank.K if param_bank is not None and not full else 0
        mat, cols = (None, None) if param_bank is None else \
            (param_bank.full_mat, param_bank.full_cols) if full else (param_bank.dense_mat, param_bank.dense_cols)
        via_grad = K and K * n * m < K * T * (n + m)
        for b0, b1 in chunks(B, m * n):
            grads = self.batch.workspace.per_example_grads(g[b0:b1], x[b0:b1])          # [b, out, in]
            flat = grads.view(b1 - b0, -1)
            self.sq[b0:b1] += torch.linalg.vector_norm(flat, dim=1, dtype=self.compute_dtype).square()
            if mat is not None:
                self.inner[b0:b1, cols] += self.num.mm(flat, mat.T)
            if K and via_grad:
                Gc = param_bank.G.to(self.compute_dtype)
                for k0, k1 in chunks(K, (b1 - b0) * m):
                    gx = self.num.mm(grads.view(-1, n), param_bank.X[k0:k1].T).view(b1 - b0, m, -1)  # [b, out, k]
                    self.inner[b0:b1] += (gx * Gc[k0:k1].T[None]).sum(1) @ param_bank.W[k0:k1]
            elif K:
                self.inner[b0:b1] += self._factored_by_activations(x[b0:b1], g[b0:b1], param_bank)
            del grads, flat

    # -------------------------------------------------------------- embedding

    def embedding(self, site, token_ids, g, mask):
        """Rows of the per-example gradient by (example, token id), summed exactly."""
        num, compute_dtype = self.num, self.compute_dtype
        B, T, d = g.shape
        V = self.batch.vocab
        sel = mask
        owner = torch.arange(B, device=g.device)[:, None].expand(B, T)[sel]
        tok = token_ids[sel]
        key = owner * V + tok
        uniq, inv = torch.unique(key, return_inverse=True)
        rows = segment_sum(g[sel].to(compute_dtype), inv, uniq.numel())
        ub, uid = uniq // V, uniq % V                   # ub is sorted (torch.unique sorts the keys)
        self.sq += segment_sum((rows * rows).sum(1), ub, B, presorted=True)
        param_bank = self._param(site.weight)
        if param_bank is not None:
            for j, lookup, ids, val in param_bank.rows:
                li = lookup[uid]
                ok = li >= 0
                self.inner[:, j] += segment_sum((rows[ok] * val[li[ok]]).sum(1), ub[ok], B, presorted=True)
            for j, D_ in param_bank.dense:
                self.inner[:, j] += segment_sum((rows * D_.view(V, d)[uid]).sum(1), ub, B, presorted=True)
            if param_bank.K:                                    # tied: the LM-head factors of the target, at these rows
                part = torch.zeros(B, self.n_targets, dtype=compute_dtype, device=g.device)
                for k0, k1 in chunks(param_bank.K, rows.shape[0]):
                    a = num.mm(num.operand(rows), param_bank.X[k0:k1].T)          # [U, k]
                    sel_g = param_bank.G[k0:k1][:, uid].T.to(compute_dtype)                  # [U, k]
                    part += segment_sum((a * sel_g) @ param_bank.W[k0:k1], ub, B, presorted=True)
                self.inner += part
        if self._stash is not None:                     # tied: 2 <E_i, H_i>
            hx, z = self._stash
            a = num.bmm(num.operand(g), hx.transpose(1, 2))              # [B, T, S]: g_t . h_s
            self.sq += 2 * (a * z.transpose(1, 2).to(compute_dtype)).sum((1, 2))
            self._stash = None
        self.after_embedding(site, rows, ub, uid)

    def after_embedding(self, site, rows, ub, uid):
        pass


class CaptureAccumulator(ScoreAccumulator):
    """Anchor pass: the norms, plus each anchor's factors / rows / dense parts for building the target."""

    def __init__(self):
        super().__init__(None)
        self.pieces: dict[str, dict[str, list]] = {}
        self.owners = None

    def _piece(self, name):
        return self.pieces.setdefault(name, {"fact": [], "rows": [], "dense": []})

    def after_dense(self, name, v):
        self._piece(name)["dense"].append((self.owners.cpu(), v.detach().cpu()))

    def after_linear(self, site, layer_input, g, mask):
        keep = mask & (g != 0).any(-1)
        owner = self.owners.to(g.device)[:, None].expand(keep.shape)[keep]
        self._piece(site.weight)["fact"].append((g[keep].cpu(), layer_input.x[keep].cpu(), owner.cpu()))

    def after_embedding(self, site, rows, ub, uid):
        self._piece(site.weight)["rows"].append((self.owners.to(ub.device)[ub].cpu(), uid.cpu(), rows.cpu()))

    def build(self, coef: torch.Tensor, shapes: dict, compute_dtype, device, layout="auto", model_dtype=None) -> dict:
        """coef[a] = 1/(N ||G_a||): the target's parts, each stored in its smallest exact form."""
        out = {}
        coef = coef.to(compute_dtype)
        for name, shape in shapes.items():
            pieces = self.pieces.get(name, {"fact": [], "rows": [], "dense": []})
            p = ParamTarget(tuple(shape))
            if pieces["dense"]:
                total = torch.zeros(int(torch.tensor(shape).prod()), dtype=compute_dtype)
                for owners, v in pieces["dense"]:
                    total += (coef[owners][:, None] * v.to(compute_dtype)).sum(0)
                p.dense = total.view(shape)
            if pieces["fact"]:
                p.fact_g = torch.cat([f[0] for f in pieces["fact"]])
                p.fact_x = torch.cat([f[1] for f in pieces["fact"]])
                p.fact_scale = coef[torch.cat([f[2] for f in pieces["fact"]])]
            if pieces["rows"]:
                owners = torch.cat([r[0] for r in pieces["rows"]])
                uid = torch.cat([r[1] for r in pieces["rows"]])
                vals = torch.cat([r[2] for r in pieces["rows"]]).to(compute_dtype) * coef[owners][:, None]
                ids, inv = torch.unique(uid, return_inverse=True)
                p.rows_ids = ids
                p.rows_val = torch.zeros(ids.numel(), shape[1], dtype=compute_dtype).index_add_(0, inv, vals)
            if p.dense is None and p.fact_g is None and p.rows_ids is None:
                p.dense = torch.zeros(shape, dtype=compute_dtype)
            numel = int(torch.tensor(shape).prod())
            dense_bytes = numel * torch.tensor([], dtype=compute_dtype).element_size()
            want_dense = layout == "dense" or (layout == "auto" and p.nbytes() >= dense_bytes)
            if p.form != "dense" and (want_dense or p.dense is not None):
                p = ParamTarget(tuple(shape), dense=p.to_dense(compute_dtype, device).cpu())
            out[name] = p
        return out


class ProjectAccumulator(Accumulator):
    """Per batch: the per-example gradients' random projection [B, proj_dim] (projection.py)."""

    def __init__(self, projector):
        self.projector = projector

    def begin(self, batch: BatchContext) -> None:
        super().begin(batch)
        self.parts = {}

    def _add(self, name, value):
        self.parts[name] = value if name not in self.parts else self.parts[name] + value

    def dense(self, name, v):
        self._add(name, self.projector.project_dense(name, v))

    def linear(self, site, layer_input, g, mask):
        self._add(site.weight, self.projector.project_linear(site.weight, g, layer_input.x))

    def embedding(self, site, token_ids, g, mask):
        self._add(site.weight, self.projector.project_embedding(site.weight, g, token_ids))

    def result(self) -> torch.Tensor:
        return self.projector.project(self.parts)
