"""Test-only views of the projections in safedata/features/projection.py: each layer's matrices made explicit, the
kept entries of a Kronecker block, and the exact error variance of a sketched inner product (the theory the tests
hold the projections to). Production code never needs these, so they live here."""
import torch

from safedata.features.projection import DenseProjector, FactoredProjector, plan_selection


def matrices(proj: FactoredProjector, name: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's unscaled (P_out, P_in), identity sides materialised as eye.

    A dense layer returns (ones(1, 1), P) with P its n x k matrix; an identity layer (eye, eye).
    """
    plan = proj.plans[name]
    device = torch.device(device) if device is not None else (proj.device or torch.device("cpu"))

    def eye(n):
        return torch.eye(n, device=device, dtype=proj.dtype)

    if plan.mode == "identity":
        return eye(plan.rows), eye(plan.cols)
    if plan.mode == "dense":
        return torch.ones(1, 1, device=device, dtype=proj.dtype), proj._dense_projector(name).matrix(device)
    p_out, p_in, _, _ = proj._kron(name, device)
    return (eye(plan.rows) if p_out is None else p_out), (eye(plan.cols) if p_in is None else p_in)


def selection(proj: FactoredProjector, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Kron layers: (flat indices into the row-major k_out x k_in block, per-entry scales)."""
    plan = proj.plans[name]
    if plan.mode != "kron":
        raise ValueError(f"layer {name!r} is {plan.mode}, not a Kronecker layer")
    return plan_selection(plan)


def dense_error_variance(proj: DenseProjector, a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact Var of <proj a, proj b> - <a, b> over a dense JL matrix."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    kappa = 1.0 if proj.kind == "rademacher" else 0.0
    value = (a @ a) * (b @ b) + (a @ b) ** 2 - 2 * kappa * ((a * a) @ (b * b))
    return float(value) / proj.proj_dim


def error_variance(proj: FactoredProjector, name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact Var(<proj a, proj b>) over the random matrices, for explicit gradients a, b of one layer.

    (Its mean is <a, b> exactly.) Sum over layers for the whole sketch: layers are independent.
    """
    plan = proj.plans[name]
    A = a.reshape(plan.rows, plan.cols).double()
    B = b.reshape(plan.rows, plan.cols).double()
    kappa = 1.0 if proj.kind == "rademacher" else 0.0
    if plan.mode == "identity":
        return 0.0
    if plan.mode == "dense":
        return dense_error_variance(proj._dense_projector(name), A, B)
    index, weight = plan_selection(plan)
    rows_of, cols_of = index // plan.k_in, index % plan.k_in
    if plan.out_identity or plan.in_identity:
        # group the kept entries by the random side's column: Y = q^T M q with M = X^T diag(c) Y
        total = 0.0
        if plan.out_identity:
            groups, members, X, Y = cols_of, rows_of, A, B           # q = P_in column, rows a exact
        else:
            groups, members, X, Y = rows_of, cols_of, A.T, B.T       # p = P_out column, cols b exact
        c = weight ** 2
        for gid in torch.unique(groups):
            mask = groups == gid
            d = torch.zeros(X.shape[0], dtype=torch.float64)
            d[members[mask]] = c[mask]
            M = X.T @ (d[:, None] * Y)
            total += float((M * M).sum() + (M * M.T).sum() - 2 * kappa * (M.diagonal() ** 2).sum())
        return total
    k = plan.k
    n_a = torch.bincount(rows_of, minlength=plan.k_out).double()
    m_b = torch.bincount(cols_of, minlength=plan.k_in).double()
    ab = float((A * B).sum())
    ABt, AtB = A @ B.T, A.T @ B
    tr2 = float((AtB * AtB.T).sum())                                  # tr((A^T B)^2)
    c_row = float((ABt ** 2).sum()) + tr2 - 2 * kappa * float((ABt.diagonal() ** 2).sum())
    c_col = float((AtB ** 2).sum()) + tr2 - 2 * kappa * float((AtB.diagonal() ** 2).sum())
    norm_a, norm_b = float((A * A).sum()), float((B * B).sum())
    # E[X^2] for one entry X = (p^T A q)(p^T B q), from the fourth moments of p then q
    e_uu_vv = norm_a * norm_b + 2 * float((ABt ** 2).sum()) \
        - 2 * kappa * float(((A * A).sum(0) * (B * B).sum(0)).sum())
    e_uv2 = ab ** 2 + float((AtB ** 2).sum()) + tr2 - 2 * kappa * float((AtB.diagonal() ** 2).sum())
    row_ab = (A * B).sum(1)
    e_diag = float(((A * A).sum(1) * (B * B).sum(1)).sum() + 2 * (row_ab ** 2).sum()
                   - 2 * kappa * ((A * A) * (B * B)).sum())
    v1 = e_uu_vv + 2 * e_uv2 - 2 * kappa * e_diag - ab ** 2
    return (k * v1 + float((n_a * (n_a - 1)).sum()) * c_row + float((m_b * (m_b - 1)).sum()) * c_col) / k ** 2
