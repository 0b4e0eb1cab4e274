"""Factored (Kronecker) gradient projections: exactness, unbiasedness, error vs theory, determinism, state."""
import json
import math
import subprocess
import textwrap

import pytest
import torch

from conftest import ROOT, python
from projection_reference import dense_error_variance, error_variance, matrices, selection
from safedata.errors import UserError
from safedata.features.projection import (DenseProjector, FactoredProjector, LayerPlan, allocate_dims, derive_seed,
                                          plan_layer, random_matrix)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def explicit_map(proj, name):
    """The layer's sketch as an explicit numel x k matrix, built from the Kronecker product of its factors."""
    plan = proj.plans[name]
    p_out, p_in = matrices(proj, name)
    if plan.mode == "identity":
        return torch.eye(plan.rows * plan.cols, dtype=F64)
    if plan.mode == "dense":
        return p_in.double() / math.sqrt(plan.k)
    index, weight = selection(proj, name)
    kron = torch.kron(p_out.double(), p_in.double())     # [(i, j), (a, b)] = P_out[i, a] P_in[j, b], row-major
    return kron[:, index] * weight


# layers covering every layout: full square grid, truncated grid, exact out side, exact in side, identity, dense
LAYOUT_SHAPES = {"full": (12, 10), "trunc": (9, 11), "small_out": (3, 40), "small_in": (30, 2),
                 "ident": (2, 3), "norm": (1, 20)}


def layout_projector(seed=0, kind="rademacher"):
    proj = FactoredProjector.__new__(FactoredProjector)
    dims = {"full": 16, "trunc": 7, "small_out": 20, "small_in": 8, "ident": 6, "norm": 5}
    proj._setup(LAYOUT_SHAPES, dims, seed, None, F64, kind)
    return proj


def test_layouts_cover_every_case():
    proj = layout_projector()
    p = proj.plans
    assert (p["full"].mode, p["full"].k_out, p["full"].k_in) == ("kron", 4, 4)
    assert (p["trunc"].k_out, p["trunc"].k_in) == (3, 3)                       # 9 >= 7 entries kept
    assert p["small_out"].out_identity and (p["small_out"].k_out, p["small_out"].k_in) == (3, 7)
    assert p["small_in"].in_identity and (p["small_in"].k_out, p["small_in"].k_in) == (4, 2)
    assert p["ident"].mode == "identity" and p["norm"].mode == "dense"


def test_linear_equals_explicit_kronecker_map():
    proj = layout_projector(seed=3)
    g = gen(0)
    B, T = 3, 5
    for name, (rows, cols) in LAYOUT_SHAPES.items():
        out_grads = torch.randn(B, T, rows, generator=g, dtype=F64)
        inputs = torch.randn(B, T, cols, generator=g, dtype=F64)
        grad = torch.einsum("bto,bti->boi", out_grads, inputs).reshape(B, -1)       # vec(G), row-major
        expected = grad @ explicit_map(proj, name)
        got = proj.project_linear(name, out_grads, inputs)
        assert got.shape == (B, proj.dims[name]) and got.dtype == F64
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 1e-10 * scale, name
        # the materialised-gradient route is the same map
        assert (proj.project_dense(name, grad) - expected).abs().max().item() <= 1e-10 * scale, name
    # the identity layer is exact: the output is vec(G) itself
    out_grads, inputs = torch.randn(B, T, 2, dtype=F64), torch.randn(B, T, 3, dtype=F64)
    assert torch.equal(proj.project_linear("ident", out_grads, inputs),
                       torch.einsum("bto,bti->boi", out_grads, inputs).reshape(B, -1))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_every_layout_is_unbiased(kind):
    """E[M M^T] = I for the explicit map M of every layout (so E<Pa,Pb> = <a,b>); for +-1 entries diag = 1 exactly."""
    total = {n: 0 for n in LAYOUT_SHAPES}
    seeds = 300
    for seed in range(seeds):
        proj = layout_projector(seed, kind)
        for name in LAYOUT_SHAPES:
            m = explicit_map(proj, name)
            mmt = m @ m.T
            if kind == "rademacher":
                assert torch.allclose(mmt.diagonal(), torch.ones(len(mmt), dtype=F64), atol=1e-12), name
            total[name] = total[name] + mmt
    for name, acc in total.items():
        mean = acc / seeds
        eye = torch.eye(len(mean), dtype=F64)
        # off-diagonal entries of one draw have std <= ~1 (sum of k products scaled 1/k... <= 1): mean of 300 < 5/sqrt(300)
        assert (mean - eye).abs().max().item() < 5 / math.sqrt(seeds), (name, (mean - eye).abs().max().item())


def test_embedding_equals_linear_with_one_hot():
    vocab, d = 50, 12
    shapes = {"embed": (vocab, d), "tiny_embed": (4, 3), "few_rows": (5, 30)}
    proj = FactoredProjector.__new__(FactoredProjector)
    proj._setup(shapes, {"embed": 40, "tiny_embed": 12, "few_rows": 27}, 1, None, F64, "rademacher")
    assert proj.plans["embed"].mode == "kron" and not proj.plans["embed"].out_identity
    assert proj.plans["tiny_embed"].mode == "identity" and proj.plans["few_rows"].out_identity
    g = gen(1)
    B, T = 4, 7
    for name, (rows, cols) in shapes.items():
        ids = torch.randint(0, rows, (B, T), generator=g)
        out_grads = torch.randn(B, T, cols, generator=g, dtype=F64)
        mask = torch.rand(B, T, generator=g) < 0.3                        # masked tokens: zero out-grads
        out_grads[mask] = 0
        got = proj.project_embedding(name, out_grads, ids)
        one_hot = torch.nn.functional.one_hot(ids, rows).to(F64)
        ref = proj.project_linear(name, one_hot, out_grads)
        assert (got - ref).abs().max().item() <= 1e-12 * ref.abs().max().item(), name
        # and equal to the explicit vocab x d gradient through the explicit map
        grad = torch.einsum("btv,btd->bvd", one_hot, out_grads).reshape(B, -1)
        ref2 = grad @ explicit_map(proj, name)
        assert (got - ref2).abs().max().item() <= 1e-10 * ref2.abs().max().item(), name
    with pytest.raises(ValueError, match="token ids"):
        proj.project_embedding("embed", torch.zeros(1, 2, d, dtype=F64), torch.tensor([[0, vocab]]))


# ----------------------------------------------------------------------------- error vs theory

VAR_SHAPES = {"blk.attn": (160, 192), "blk.mlp": (256, 160), "embed": (320, 96), "norm": (1, 192)}


REGIMES = ("independent", "similar", "shared_input")


def make_pairs(n_pairs, regime, seed, T=3):
    """Per layer: token data of a (first n) and b (last n), b = c a + sqrt(1-c^2) a' (a' independent of a).

    independent: c = 0, every token vector iid N(0, I) (a training example against an unrelated anchor).
    similar: c ~ U(0, .95), token vectors iid N(0, I): a and b share tokens, so ||A B^T|| ~ c |A||B|/sqrt(rank).
    shared_input: c ~ U(0, .95), and within a pair all inputs of a linear layer share one direction
    (x_t = z + 0.3 eps) and embedding tokens come from 3 shared ids (anisotropic activations): the
    Kronecker sketch's bad case, C_row ~ (x.y)^2 |g|^2 |h|^2.
    """
    g = gen(seed)
    c = torch.rand(n_pairs, generator=g, dtype=F64) * 0.95
    if regime == "independent":
        c = torch.zeros_like(c)
    s = (1 - c ** 2).sqrt()
    data, explicit = {}, {}
    for name, (rows, cols) in VAR_SHAPES.items():
        if rows == 1:
            a = torch.randn(n_pairs, cols, generator=g, dtype=F64)
            b = c[:, None] * a + s[:, None] * torch.randn(n_pairs, cols, generator=g, dtype=F64)
            data[name] = torch.cat([a, b])
            explicit[name] = (a, b)
            continue
        if name == "embed":
            pool = torch.randint(0, rows, (n_pairs, 3), generator=g)
            def tokens():
                if regime == "shared_input":
                    return torch.gather(pool, 1, torch.randint(0, 3, (n_pairs, T), generator=g))
                return torch.randint(0, rows, (n_pairs, T), generator=g)
            ids_a, ids_a2 = tokens(), tokens()
            ga, ga2 = torch.randn(n_pairs, T, cols, generator=g, dtype=F64), torch.randn(n_pairs, T, cols, generator=g, dtype=F64)
            ids = torch.cat([torch.cat([ids_a, torch.zeros_like(ids_a)], 1), torch.cat([ids_a, ids_a2], 1)])
            grads = torch.cat([torch.cat([ga, torch.zeros_like(ga)], 1),
                               torch.cat([c[:, None, None] * ga, s[:, None, None] * ga2], 1)])
            data[name] = (grads, ids)
            one_hot = torch.nn.functional.one_hot(ids, rows).to(F64)
            full = torch.einsum("btv,btd->bvd", one_hot, grads)
        else:
            z = torch.randn(n_pairs, 1, cols, generator=g, dtype=F64)
            def inputs():
                eps = torch.randn(n_pairs, T, cols, generator=g, dtype=F64)
                return z + 0.3 * eps if regime == "shared_input" else eps
            xa, xa2 = inputs(), inputs()
            ga, ga2 = torch.randn(n_pairs, T, rows, generator=g, dtype=F64), torch.randn(n_pairs, T, rows, generator=g, dtype=F64)
            outs = torch.cat([torch.cat([ga, torch.zeros_like(ga)], 1),
                              torch.cat([c[:, None, None] * ga, s[:, None, None] * ga2], 1)])
            ins = torch.cat([torch.cat([xa, xa2], 1), torch.cat([xa, xa2], 1)])
            data[name] = (outs, ins)
            full = torch.einsum("bto,bti->boi", outs, ins)
        explicit[name] = (full[:n_pairs].reshape(n_pairs, -1), full[n_pairs:].reshape(n_pairs, -1))
    return data, explicit


def sketch(proj, data):
    per_layer = {}
    for name, value in data.items():
        if name == "embed":
            per_layer[name] = proj.project_embedding(name, *value)
        elif name == "norm":
            per_layer[name] = proj.project_dense(name, value)
        else:
            per_layer[name] = proj.project_linear(name, *value)
    return proj.project(per_layer)


def measure(kind, regime, proj_dim, n_pairs=40, seeds=40):
    """rms of (<Pa,Pb> - <a,b>) / (|a||b|): (empirical, predicted, dense JL of the whole vector, dense JL per
    layer with the same dims) -- the last isolates the Kronecker structure from the budget allocation."""
    data, explicit = make_pairs(n_pairs, regime, seed=100 + proj_dim)
    a = torch.cat([explicit[n][0] for n in sorted(explicit)], 1)
    b = torch.cat([explicit[n][1] for n in sorted(explicit)], 1)
    true = (a * b).sum(1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    errors = []
    for seed in range(seeds):
        proj = FactoredProjector(VAR_SHAPES, proj_dim, seed=seed, dtype=F64, kind=kind)
        feats = sketch(proj, data)
        errors.append(((feats[:n_pairs] * feats[n_pairs:]).sum(1) - true) / norms)
    errors = torch.cat(errors)
    pred = torch.tensor([sum(error_variance(proj, n, explicit[n][0][i], explicit[n][1][i]) for n in VAR_SHAPES)
                         for i in range(n_pairs)], dtype=F64) / norms ** 2
    dense = DenseProjector(a.shape[1], proj_dim, kind=kind)
    dense_pred = torch.tensor([dense_error_variance(dense, a[i], b[i]) for i in range(n_pairs)], dtype=F64) / norms ** 2
    layer_dense = {n: DenseProjector(r * c, proj.dims[n], kind=kind) for n, (r, c) in VAR_SHAPES.items()}
    alloc_pred = torch.tensor([sum(dense_error_variance(layer_dense[n], explicit[n][0][i], explicit[n][1][i])
                                   for n in VAR_SHAPES) for i in range(n_pairs)], dtype=F64) / norms ** 2
    return tuple(v.item() for v in (errors.pow(2).mean().sqrt(), pred.mean().sqrt(), dense_pred.mean().sqrt(),
                                    alloc_pred.mean().sqrt()))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_product_error_matches_theory(kind):
    results = {(regime, k): measure(kind, regime, k) for regime in REGIMES for k in (64, 256)}
    for (regime, k), (emp, pred, dense, per_layer) in results.items():
        print(f"{kind} {regime} k={k}: empirical {emp:.4f} predicted {pred:.4f} dense-JL {dense:.4f} "
              f"per-layer dense-JL {per_layer:.4f} 1/sqrt(k) {1 / math.sqrt(k):.4f}")
        assert pred / 1.2 < emp < pred * 1.2, (regime, k, emp, pred)              # the fourth-moment formula
        assert 0.8 / math.sqrt(k) < dense < 1.35 / math.sqrt(k)                  # dense: sqrt((1 + cos^2) / k)
    for k in (64, 256):
        # unrelated pairs: the Kronecker sketch is as good as dense JL maps with the same per-layer dims (the
        # whole-vector dense JL is better here only because numel allocation gives dims to low-energy layers)
        assert results[("independent", k)][1] < 1.08 * results[("independent", k)][3]
        # related pairs / shared input direction: the C_row/k_out + C_col/k_in terms make it worse
        assert results[("similar", k)][1] > 1.4 * results[("similar", k)][3]
        assert results[("shared_input", k)][1] > 2.5 * results[("shared_input", k)][3]
    # quadrupling k: std halves for unrelated pairs (1/sqrt(k)); with the Kronecker terms it shrinks less
    # (they fall as 1/k_out ~ 1/sqrt(k): std ~ k^-1/4 in the limit), by the predicted factor
    ratio = {r: results[(r, 256)][0] / results[(r, 64)][0] for r in REGIMES}
    pred_ratio = {r: results[(r, 256)][1] / results[(r, 64)][1] for r in REGIMES}
    print(kind, "std(k=256)/std(k=64): empirical", ratio, "predicted", pred_ratio)
    assert 0.42 < ratio["independent"] < 0.6
    for r in ("similar", "shared_input"):
        assert 0.55 < pred_ratio[r] < 0.75 and abs(ratio[r] / pred_ratio[r] - 1) < 0.15, (r, ratio, pred_ratio)


def test_error_variance_matches_monte_carlo_for_one_pair():
    """The closed form (fourth moments) against the variance over 3000 draws, for a fixed correlated pair."""
    g = gen(5)
    shapes = {"w": (6, 5), "exact_out": (2, 9)}
    for kind in ("rademacher", "gaussian"):
        for name, dims in (("w", 11), ("exact_out", 7)):
            rows, cols = shapes[name]
            z = torch.randn(cols, generator=g, dtype=F64)
            xa, xb = z + 0.5 * torch.randn(3, cols, generator=g, dtype=F64), z + 0.5 * torch.randn(2, cols, generator=g, dtype=F64)
            ga, gb = torch.randn(3, rows, generator=g, dtype=F64), torch.randn(2, rows, generator=g, dtype=F64)
            A, Bm = ga.T @ xa, gb.T @ xb
            values = []
            for seed in range(3000):
                proj = FactoredProjector.__new__(FactoredProjector)
                proj._setup({name: shapes[name]}, {name: dims}, seed, None, F64, kind)
                m = explicit_map(proj, name)
                values.append((A.reshape(-1) @ m) @ (Bm.reshape(-1) @ m))
            values = torch.stack(values)
            var = error_variance(proj, name, A, Bm)
            true = (A * Bm).sum().item()
            # the mean is <A,B>; the sample variance of 3000 draws is within ~10% of the formula
            assert abs(values.mean().item() - true) < 4 * math.sqrt(var / 3000), (kind, name)
            assert abs(values.var().item() / var - 1) < 0.15, (kind, name, values.var().item(), var)


def test_dense_projector():
    g = gen(2)
    a, b = torch.randn(300, dtype=F64, generator=g), torch.randn(300, dtype=F64, generator=g)
    b = 0.6 * a + 0.8 * b
    values = torch.stack([(lambda p: (p.project(a[None]) * p.project(b[None])).sum())(
        DenseProjector(300, 30, seed=s, dtype=F64)) for s in range(1500)])
    var = dense_error_variance(DenseProjector(300, 30, dtype=F64), a, b)
    assert abs(values.mean().item() - (a @ b).item()) < 4 * math.sqrt(var / 1500)
    assert abs(values.var().item() / var - 1) < 0.15
    # streamed (block by block) equals cached; state round trip
    import safedata.features.projection as P
    p = DenseProjector(1000, 64, seed=4)
    x = torch.randn(3, 1000, generator=g)
    cached = p.project(x)
    old = P.DENSE_CACHE_ELEMENTS
    try:
        P.DENSE_CACHE_ELEMENTS = 10
        assert torch.allclose(DenseProjector(1000, 64, seed=4).project(x), cached, atol=1e-5)
    finally:
        P.DENSE_CACHE_ELEMENTS = old
    q = DenseProjector.from_state_dict(json.loads(json.dumps(p.state_dict())))
    assert torch.equal(q.project(x), cached)


# ----------------------------------------------------------------------------- determinism and state

DET_SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch
    sys.path.insert(0, "tests")                     # the test helpers (run from the repository root)
    from projection_reference import matrices
    from safedata.features.projection import FactoredProjector
    shapes = {"layers.0.q": (16, 12), "layers.0.mlp": (20, 12), "embed": (30, 12), "norm": (1, 12)}
    p = FactoredProjector(shapes, 40, seed=SEED)
    g = torch.Generator().manual_seed(0)
    out = {"layers.0.q": p.project_linear("layers.0.q", torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 12, generator=g)),
           "layers.0.mlp": p.project_linear("layers.0.mlp", torch.randn(2, 3, 20, generator=g), torch.randn(2, 3, 12, generator=g)),
           "embed": p.project_embedding("embed", torch.randn(2, 3, 12, generator=g), torch.randint(0, 30, (2, 3), generator=g)),
           "norm": p.project_dense("norm", torch.randn(2, 12, generator=g))}
    feats = p.project(out)
    mats = b"".join(m.numpy().tobytes() for n in p.order for m in matrices(p, n))
    print(hashlib.sha256(feats.numpy().tobytes()).hexdigest(), hashlib.sha256(mats).hexdigest())
""")


def run_det(seed, fresh):
    code = DET_SCRIPT.replace("SEED", str(seed))
    if fresh:
        out = subprocess.run([python(), "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        return out.stdout.split()
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})
    return buf.getvalue().split()


def test_deterministic_across_processes_and_seeds():
    here, there = run_det(7, fresh=False), run_det(7, fresh=True)
    assert here == there                                   # identical bytes: features and matrices
    other = run_det(8, fresh=False)
    assert other[0] != here[0] and other[1] != here[1]


def test_matrices_depend_only_on_seed_name_shape_k():
    two = FactoredProjector({"a": (30, 40), "b": (30, 40)}, 40, seed=1)
    three = FactoredProjector({"a": (30, 40), "b": (30, 40), "c": (30, 40)}, 60, seed=1)
    assert two.dims["a"] == three.dims["a"] == 20
    for x, y in zip(matrices(two, "a"), matrices(three, "a")):
        assert torch.equal(x, y)
    expected_out = random_matrix(30, two.plans["a"].k_out, derive_seed(1, "a", "out"), "rademacher")
    assert torch.equal(matrices(two, "a")[0], expected_out)
    assert not torch.equal(matrices(two, "a")[0], matrices(two, "b")[0])
    # the rademacher and gaussian entries have mean 0, variance 1
    m = random_matrix(400, 300, 9, "gaussian")
    assert abs(m.mean().item()) < 0.01 and abs(m.var().item() - 1) < 0.02
    r = random_matrix(400, 300, 9, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean().item()) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_same_matrices_on_gpu():
    p = FactoredProjector({"a": (300, 200), "e": (1000, 64)}, 100, seed=3)
    for name in p.order:
        for x, y in zip(matrices(p, name, "cpu"), matrices(p, name, "cuda")):
            assert torch.equal(x, y.cpu())


def test_state_dict_round_trip():
    shapes = {"layers.0.q": (16, 12), "embed": (30, 12), "norm": (1, 12), "tiny": (2, 2)}
    p = FactoredProjector(shapes, 30, seed=11, kind="gaussian")
    state = json.loads(json.dumps(p.state_dict()))
    assert "matrices" not in json.dumps(state) and set(state) >= {"seed", "layer_shapes", "dims", "kind"}
    q = FactoredProjector.from_state_dict(state)
    assert q.dims == p.dims and q.plans == p.plans and q.order == p.order and q.kind == "gaussian"
    g = gen(3)
    x = {n: torch.randn(4, r * c, generator=g) for n, (r, c) in shapes.items()}
    assert torch.equal(p.project(x), q.project(x))
    assert q.project(x).shape == (4, 30)
    state["seed"] = 12
    assert not torch.equal(FactoredProjector.from_state_dict(state).project(x), p.project(x))
    state["version"] = 99
    with pytest.raises(UserError, match="v99"):
        FactoredProjector.from_state_dict(state)


def test_project_concatenates_in_sorted_order():
    p = FactoredProjector({"z": (1, 5), "a": (1, 5)}, 10, seed=0)
    assert p.order == ["a", "z"] and p.offsets == {"a": (0, 5), "z": (5, 10)}      # identity layers (k = numel)
    a, z = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.equal(p.project({"z": z, "a": a}), torch.cat([a, z], 1))
    with pytest.raises(KeyError, match="missing"):
        p.project({"a": a})


# ----------------------------------------------------------------------------- allocation


def test_allocation():
    assert allocate_dims({"a": 100, "b": 300, "c": 1}, 10) == {"a": 2, "b": 7, "c": 1}
    sizes = {f"layers.{i}.{n}": s for i in range(5) for n, s in (("q", 4096), ("mlp", 11008), ("norm", 64))}
    for proj_dim in (15, 16, 100, 1000, 8192, sum(sizes.values())):
        dims = allocate_dims(sizes, proj_dim)
        assert sum(dims.values()) == proj_dim and all(1 <= dims[n] <= sizes[n] for n in sizes)
        assert dims == allocate_dims(dict(reversed(list(sizes.items()))), proj_dim)     # dict order irrelevant
        assert dims == allocate_dims(sizes, proj_dim)
    dims = allocate_dims(sizes, 1000)
    assert all(abs(dims[n] - 1000 * sizes[n] / sum(sizes.values())) < 1 for n in sizes)  # proportional to numel
    assert allocate_dims(sizes, sum(sizes.values())) == sizes                           # everything exact
    with pytest.raises(UserError, match="below the number"):
        allocate_dims(sizes, 14)
    with pytest.raises(UserError, match="exceeds"):
        allocate_dims(sizes, sum(sizes.values()) + 1)
    p = FactoredProjector({"w": (4, 5), "n": (1, 3)}, 23)
    assert p.dims == {"n": 3, "w": 20} and all(pl.mode == "identity" for pl in p.plans.values())


def test_plan_factorisation():
    assert plan_layer(4096, 4096, 20) == LayerPlan(4096, 4096, 20, "kron", 5, 4)
    assert plan_layer(11008, 4096, 55) == LayerPlan(11008, 4096, 55, "kron", 8, 7)
    for rows, cols in ((4096, 4096), (32000, 64), (8, 4096), (4096, 8), (3, 3)):
        for k in range(1, min(rows * cols, 300)):
            p = plan_layer(rows, cols, k)
            if p.mode != "kron":
                continue
            assert k <= p.k_out * p.k_in < k + max(p.k_out, p.k_in) and p.k_out <= rows and p.k_in <= cols
            if not (p.out_identity or p.in_identity):
                assert max(p.k_out, p.k_in) <= math.isqrt(k - 1) + 2                 # square-ish
