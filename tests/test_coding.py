"""Tests for companion.coding.encode against independent oracles (Chapter 2, T1)."""

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

from companion.coding import ConvergenceWarning, EncodeInfo, encode, nonneg_lasso_value
from companion.certificates import certify


pytestmark = pytest.mark.usefixtures("one_thread")


def make_problem(n, d, k, seed, s=3, noise=0.05, dtype=np.float64):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((k, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Z = np.zeros((n, k))
    for i in range(n):
        idx = rng.choice(k, size=min(s, k), replace=False)
        Z[i, idx] = rng.uniform(0.5, 1.5, size=idx.size)
    X = Z @ D + noise * rng.standard_normal((n, d))
    return X.astype(dtype), D.astype(dtype)


def objective(X, D, Z, lam):
    R = X - Z @ D
    return 0.5 * (R * R).sum(1) + lam * Z.sum(1)


def qp_projection(x, D, lam):
    """Independent oracle: Euclidean projection of x onto {r : D r <= lam} by SLSQP."""
    cons = {"type": "ineq", "fun": lambda r: lam - D @ r, "jac": lambda r: -D}
    res = scipy.optimize.minimize(lambda r: 0.5 * np.sum((r - x) ** 2), np.zeros_like(x),
                                  jac=lambda r: r - x, constraints=[cons], method="SLSQP",
                                  options={"ftol": 1e-15, "maxiter": 1000})
    return res.x


def lbfgsb_codes(x, D, lam):
    """Independent oracle: the primal by L-BFGS-B with bounds z >= 0."""
    G, c = D @ D.T, D @ x
    f = lambda z: (0.5 * z @ G @ z - (c - lam) @ z, G @ z - (c - lam))
    res = scipy.optimize.minimize(f, np.zeros(D.shape[0]), jac=True, method="L-BFGS-B",
                                  bounds=[(0, None)] * D.shape[0],
                                  options={"ftol": 1e-16, "gtol": 1e-12, "maxiter": 5000})
    return res.x


@pytest.mark.parametrize("seed,d,k", [(0, 6, 4), (1, 6, 12), (2, 8, 20), (3, 5, 5)])
def test_residual_is_qp_projection(seed, d, k):
    X, D = make_problem(8, d, k, seed)
    lam = 0.2
    Z = encode(X, D, lam)
    R = X - Z @ D
    for n in range(X.shape[0]):
        r_qp = qp_projection(X[n], D, lam)
        np.testing.assert_allclose(R[n], r_qp, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_matches_lbfgsb(seed):
    X, D = make_problem(10, 8, 24, seed)
    lam = 0.15
    Z = encode(X, D, lam)
    for n in range(X.shape[0]):
        z = lbfgsb_codes(X[n], D, lam)
        ours = objective(X[n:n + 1], D, Z[n:n + 1], lam)[0]
        ref = objective(X[n:n + 1], D, z[None], lam)[0]
        assert ours <= ref + 1e-10


def test_objective_matches_sklearn_sparse_encode():
    from sklearn.decomposition import sparse_encode
    X, D = make_problem(300, 16, 48, 4)
    lam = 0.1
    Z = encode(X, D, lam)
    # sklearn's lasso_cd divides alpha by n_features internally, so alpha=lam solves our problem
    Zs = sparse_encode(X, D, alpha=lam, algorithm="lasso_cd", positive=True, max_iter=10000)
    ours, ref = objective(X, D, Z, lam).mean(), objective(X, D, Zs, lam).mean()
    assert ours <= ref * (1 + 1e-9)
    assert abs(ours - ref) <= 1e-6 * ref


@pytest.mark.parametrize("seed,shape", [(0, (50, 10, 5)), (1, (60, 8, 40)), (2, (40, 16, 64)),
                                        (3, (30, 3, 30))])
def test_kkt_property_random(seed, shape):
    n, d, k = shape
    X, D = make_problem(n, d, k, seed, s=min(3, k))
    for lam in (0.05, 0.3):
        Z, info = encode(X, D, lam, return_info=True)
        assert isinstance(info, EncodeInfo) and info.converged
        assert (Z >= 0).all()
        rep = certify(X, D, lam, Z)
        assert rep.t1_violation <= 1e-6
        assert rep.duality_gap <= 1e-8


def test_lambda_large_gives_zero_codes():
    X, D = make_problem(20, 6, 10, 5)
    lam = float(np.linalg.norm(X, axis=1).max()) + 1.0
    Z = encode(X, D, lam)
    assert np.all(Z == 0)


def test_nonneg_lasso_value_matches_projection_identity():
    X, D = make_problem(20, 6, 10, 6)
    lam = 0.2
    f = nonneg_lasso_value(X, D, lam, reduction="none")
    for n in range(5):
        r = qp_projection(X[n], D, lam)
        expected = 0.5 * X[n] @ X[n] - 0.5 * np.sum((X[n] - r) ** 2)
        assert abs(f[n] - expected) <= 1e-6
    assert abs(nonneg_lasso_value(X, D, lam) - f.mean()) <= 1e-12


def test_float32_and_kinds():
    X, D = make_problem(64, 12, 30, 7)
    lam = 0.1
    Z64 = encode(X, D, lam)
    Z32 = encode(X.astype(np.float32), D.astype(np.float32), lam)
    assert isinstance(Z32, np.ndarray) and Z32.dtype == np.float32
    o64 = objective(X, D, Z64, lam).mean()
    o32 = objective(X, D, Z32.astype(np.float64), lam).mean()
    assert abs(o32 - o64) <= 1e-4 * o64
    Zt = encode(torch.from_numpy(X), torch.from_numpy(D), lam)
    assert isinstance(Zt, torch.Tensor) and Zt.dtype == torch.float64
    np.testing.assert_allclose(Zt.numpy(), Z64, atol=1e-12)
    Zt32 = encode(torch.from_numpy(X).float(), torch.from_numpy(D).float(), lam)
    assert Zt32.dtype == torch.float32
    assert certify(torch.from_numpy(X).float(), torch.from_numpy(D).float(), lam,
                   Zt32).t1_violation <= 1e-3


def test_chunking_and_warm_start_agree():
    X, D = make_problem(101, 10, 40, 8)
    lam = 0.1
    Z = encode(X, D, lam)
    Zc = encode(X, D, lam, chunk_size=7)
    np.testing.assert_allclose(Z, Zc, atol=1e-10)
    rng = np.random.default_rng(0)
    Z0 = np.abs(Z + 0.1 * rng.standard_normal(Z.shape)) * (rng.random(Z.shape) < 0.3)
    Zw = encode(X, D, lam, Z0=Z0)
    np.testing.assert_allclose(Z, Zw, atol=1e-8)


def test_add_per_iter_variants_agree():
    X, D = make_problem(80, 10, 60, 9)
    Z1 = encode(X, D, 0.1, add_per_iter=1)
    Z8 = encode(X, D, 0.1, add_per_iter=8)
    np.testing.assert_allclose(Z1, Z8, atol=1e-6)


def test_rank_deficient_and_duplicate_atoms():
    rng = np.random.default_rng(10)
    d = 4
    D = rng.standard_normal((6, d))
    D = np.vstack([D, D[:3], (D[0] + D[1])[None] / np.linalg.norm(D[0] + D[1])])   # duplicates + span
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    X = np.abs(rng.standard_normal((30, 10))) @ D + 0.01 * rng.standard_normal((30, d))
    lam = 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        Z = encode(X, D, lam)
    rep = certify(X, D, lam, Z)
    assert rep.t1_violation <= 1e-6
    for n in range(5):
        z = lbfgsb_codes(X[n], D, lam)
        assert objective(X[n:n+1], D, Z[n:n+1], lam)[0] <= objective(X[n:n+1], D, z[None], lam)[0] + 1e-9


def test_convergence_warning_names_violation():
    X, D = make_problem(40, 10, 60, 11)
    with pytest.warns(ConvergenceWarning, match="KKT violation"):
        Z, info = encode(X, D, 0.05, max_iter=1, fallback_iter=1, return_info=True)
    assert not info.converged and info.max_kkt_violation > info.tol


def test_input_errors():
    X, D = make_problem(10, 5, 7, 12)
    with pytest.raises(ValueError, match="lam"):
        encode(X, D, 0.0)
    with pytest.raises(ValueError, match="lam"):
        encode(X, D, -1.0)
    Xn = X.copy(); Xn[0, 0] = np.nan
    with pytest.raises(ValueError, match="X"):
        encode(Xn, D, 0.1)
    with pytest.raises(ValueError, match="D"):
        encode(X, D[:, :4], 0.1)
    with pytest.raises(ValueError, match="D"):
        encode(X, 2 * D, 0.1)
    Dz = D.copy(); Dz[2] = 0
    with pytest.raises(ValueError, match="D"):
        encode(X, Dz, 0.1)
    with pytest.raises(TypeError, match="D"):
        encode(X, D.astype(np.float32), 0.1)
    with pytest.raises(ValueError, match="X"):
        encode(X[0], D, 0.1)
    with pytest.raises(ValueError, match="Z0"):
        encode(X, D, 0.1, Z0=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="Z0"):
        encode(X, D, 0.1, Z0=-np.ones((10, 7)))
    with pytest.raises(ValueError, match="chunk_size"):
        encode(X, D, 0.1, chunk_size=0)


def test_gram_free_path_agrees(monkeypatch):
    """Large dictionaries skip the Gram matrix and gather atoms instead: same codes."""
    import companion.coding as coding
    X, D = make_problem(120, 12, 50, 13, s=4)
    Z = encode(X, D, 0.1)
    monkeypatch.setattr(coding, "_GRAM_ENTRIES", 0)
    Zg = encode(X, D, 0.1)
    np.testing.assert_allclose(Z, Zg, atol=1e-10)
    assert certify(X, D, 0.1, Zg).t1_violation <= 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lawson_hanson_step_descends_to_support_minimiser(seed):
    """The inner loop (with its bold drop-all candidate) never raises a row's objective and
    ends at a nonnegative point that solves the system on the support it keeps."""
    from companion.coding import _Dict, _lawson_hanson_inner
    X, D = make_problem(60, 8, 24, 20 + seed, s=5)
    lam = 0.05
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    Dc = _Dict(Dt)
    Ce = Xt @ Dc.De.T
    Ce[:, Dc.k] = lam
    g = torch.Generator().manual_seed(seed)
    w = 10
    idx = torch.stack([torch.randperm(Dc.k, generator=g)[:w] for _ in range(60)])
    idx[:, -2:] = Dc.pad                                   # some padding slots
    z = torch.rand(60, w, generator=g, dtype=torch.float64) * (idx < Dc.pad)

    def value(idx, z):
        R = Dc.residual(Xt, idx, z)
        return 0.5 * (R * R).sum(1) + lam * z.sum(1)

    before = value(idx, z)
    idx2, z2, _ = _lawson_hanson_inner(Dc, Ce.reshape(-1), torch.arange(60), idx.clone(), z.clone(),
                                       lam, 1e-12)
    after = value(idx2, z2)
    assert bool((after <= before + 1e-12).all())
    assert bool((z2 >= 0).all()) and bool((z2[idx2 == Dc.pad] == 0).all())
    on = idx2 < Dc.pad
    assert bool((z2[on] > 0).all())
    # on the kept support the residual correlations equal lambda (the support optimum)
    corr = Dc.residual(Xt, idx2, z2) @ Dc.De.T
    gap = (corr.gather(1, idx2) - lam).abs()[on]
    assert float(gap.max()) <= 1e-9


def test_round_limited_encode_is_a_feasible_descent():
    """With a round limit and no fallback (the partial codes of fit_dictionary's early
    iterations) the codes are nonnegative and no row is worse than its warm start."""
    from companion.coding import _encode_tensor
    X, D = make_problem(200, 10, 40, 21, s=4)
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    lam = 0.05
    Z0 = encode(Xt, Dt, lam)
    D2 = Dt + 0.2 * torch.from_numpy(np.random.default_rng(1).standard_normal(D.shape))
    D2 = D2 / D2.norm(dim=1, keepdim=True)
    Zp, info = _encode_tensor(Xt, D2, lam, 1e-9, 1, 64, Z0, False, 2, 0)
    assert bool((Zp >= 0).all())
    assert info.n_fallback_rows > 0 and not info.converged  # the limit really bit
    f0 = torch.from_numpy(objective(X, D2.numpy(), Z0.numpy(), lam))
    fp = torch.from_numpy(objective(X, D2.numpy(), Zp.numpy(), lam))
    assert bool((fp <= f0 + 1e-12).all()) and float((f0 - fp).max()) > 0


def test_long_supports_grow_faster_with_the_same_codes(monkeypatch):
    """Rows with long supports get more atoms per round once their additions survive:
    fewer rounds, the same certified codes as adding two at a time."""
    import companion.coding as coding
    X, D = make_problem(100, 128, 300, 31, s=24, noise=0.02)
    Z, info = encode(X, D, 0.1, return_info=True)
    assert (Z > 0).sum(1).mean() >= 16                     # the regime where growth applies
    monkeypatch.setattr(coding, "_GROW_FROM", 10**9)
    Z2, info2 = encode(X, D, 0.1, return_info=True)
    assert info.n_iter < info2.n_iter
    np.testing.assert_allclose(Z, Z2, atol=1e-8)
    assert certify(X, D, 0.1, Z).t1_violation <= 1e-9


def t1_per_row(X, D, Z, lam):
    """Independent T1 violation of each row, recomputed in float64 from the residual."""
    X, D, Z = (np.asarray(a, dtype=np.float64) for a in (X, D, Z))
    g = (X - Z @ D) @ D.T - lam
    return np.where(Z > 0, np.abs(g), np.maximum(g, 0)).max(1)


def test_tolerance_is_per_row_and_in_units_of_lambda():
    """One large row does not loosen the others: every row meets tol * lam on its own."""
    X, D = make_problem(60, 10, 40, 40)
    lam = 0.1
    Xo = X.copy()
    Xo[0] *= 1e4
    Z, info = encode(Xo, D, lam, return_info=True)
    assert info.converged and info.tol == 1e-8
    v = t1_per_row(Xo, D, Z, lam)
    assert v[1:].max() <= 1e-8 * lam
    assert abs(info.kkt_violation_lam - info.max_kkt_violation / lam) <= 1e-12
    np.testing.assert_allclose(Z[1:], encode(X, D, lam)[1:], atol=1e-9)


def test_float32_outlier_row_warns_and_keeps_other_rows_exact():
    """A BOS-like row of norm 3000 in float32: its tolerance cannot be resolved (rounding
    alone is ~eps*3000 = 3.6e-4 > 1e-3 * lam): a ConvergenceWarning names the dtype, that
    row is exact to rounding (not lambdas off), and every other row is certified."""
    X, D = make_problem(200, 32, 128, 41)
    lam = 0.1
    X = X.astype(np.float32)
    D = D.astype(np.float32)
    X[7] *= 3000.0 / np.linalg.norm(X[7])
    with pytest.warns(ConvergenceWarning, match="float32 rounding"):
        Z, info = encode(X, D, lam, return_info=True)
    assert not info.converged and info.n_unconverged_rows == 1 and info.n_dtype_limited_rows == 1
    assert abs(info.dtype_limited_norm - 3000) <= 1
    v = t1_per_row(X, D, Z, lam) / lam
    others = np.delete(v, 7)
    assert others.max() <= 1e-3                           # the requested tol, row by row
    assert 1e-3 < info.kkt_violation_lam <= 0.1           # rounding level, not 3 lambda
    assert v[7] <= 0.1


def test_huge_inputs_warn_instead_of_zero_codes():
    """X * 1e200: no infinite tolerance, no all-zero 'converged' codes. The problem is
    lam ~ 1e-201 relative to the rows (nonnegative least squares): the residuals are X's
    NNLS residuals times 1e200 and the warning says float64 cannot resolve the tolerance."""
    X, D = make_problem(12, 8, 20, 42)
    lam = 0.1
    with pytest.warns(ConvergenceWarning, match="float64 rounding"):
        Z, info = encode(X * 1e200, D, lam, return_info=True)
    assert not info.converged and np.isfinite(Z).all() and (Z > 0).any()
    assert info.kkt_violation_lam > 1e100
    for n in range(3):                  # NNLS codes need not be unique; residuals are
        ref, rnorm = scipy.optimize.nnls(D.T, X[n])
        assert abs(np.linalg.norm(X[n] - Z[n] / 1e200 @ D) - rnorm) <= 1e-9 * np.linalg.norm(X[n])


def test_tiny_lambda_is_not_silently_converged():
    """lam = 1e-12: T1 <= 1e-8 * lam is below float64 rounding of rows of norm ~2; the
    warning fires and EncodeInfo's T1 in units of lambda matches an independent recomputation."""
    X, D = make_problem(30, 8, 24, 43)
    lam = 1e-12
    with pytest.warns(ConvergenceWarning, match="float64 rounding"):
        Z, info = encode(X, D, lam, return_info=True)
    assert not info.converged and info.n_dtype_limited_rows > 0
    v = t1_per_row(X, D, Z, lam) / lam
    assert v.max() > 1e-8
    assert 0.1 <= info.kkt_violation_lam / v.max() <= 10     # same size, other rounding
    ref = np.stack([scipy.optimize.nnls(D.T, x)[0] for x in X[:3]])
    assert (objective(X[:3], D, Z[:3], lam) <= objective(X[:3], D, ref, lam) + 1e-15).all()


def test_warm_start_init_codes_and_supports():
    """init= (codes or boolean supports) gives the same exact codes in fewer rounds; the old
    Z0= spelling still works; both at once is refused."""
    X, D = make_problem(150, 16, 64, 44, s=4)
    lam = 0.05
    Z, info = encode(X, D, lam, return_info=True)
    rng = np.random.default_rng(1)
    Zp = np.abs(Z * (1 + 0.2 * rng.standard_normal(Z.shape)))
    Zi, info_i = encode(X, D, lam, init=Zp, return_info=True)
    Zs, info_s = encode(X, D, lam, init=Z > 0, return_info=True)
    Zt = encode(torch.from_numpy(X), torch.from_numpy(D), lam, init=torch.from_numpy(Z > 0))
    for W in (Zi, Zs, Zt.numpy(), encode(X, D, lam, Z0=Zp)):
        np.testing.assert_allclose(W, Z, atol=1e-9)
    assert info_i.n_iter < info.n_iter and info_s.n_iter < info.n_iter
    with pytest.raises(ValueError, match="init"):
        encode(X, D, lam, init=Zp, Z0=Zp)
    with pytest.raises(ValueError, match="init"):
        encode(X, D, lam, init=Zp[:, :5])


@pytest.mark.parametrize("gram", [True, False])
def test_bitwise_independent_of_thread_count(monkeypatch, gram):
    """The codes are the same bits on 1 and 2 threads (and so whatever the machine's load
    does to OpenMP's team size), on both correlation paths and from a warm start."""
    import companion.coding as coding
    if not gram:
        monkeypatch.setattr(coding, "_GRAM_ENTRIES", 0)
    X, D = make_problem(700, 24, 300, 45, s=6)
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    n = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            Z = encode(Xt, Dt, 0.05)
            out.append((Z, encode(Xt, Dt, 0.05, init=(Z > 0) & (torch.rand(Z.shape, generator=torch.Generator().manual_seed(0)) < 0.5)),
                        encode(Xt.float(), Dt.float(), 0.05)))
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_long_supports_bucketed_lazy_gram_and_thread_independent(monkeypatch):
    """Supports of ~30 atoms: factorised in groups of similar size, the same codes as one
    padded batch; a deferred Gram matrix is formed once the support blocks cost as much,
    same codes; and the same bits on 1 and 2 threads."""
    import companion.coding as coding
    from companion.coding import _Dict, _encode_tensor
    X, D = make_problem(200, 48, 200, 5, s=30, noise=0.05)
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    lam = 0.02
    Z, info = encode(Xt, Dt, lam, return_info=True)
    assert info.max_support >= coding._BUCKET_WIDTH and info.converged
    assert certify(Xt, Dt, lam, Z).t1_violation <= 1e-8 * lam * 10
    Dc = _Dict(Dt, n_rows=1)                                  # Gram matrix deferred
    assert Dc.G is None
    Zl = _encode_tensor(Xt, Dt, lam, 1e-8, 200, 200, None, False, 2, 5000, Dc=Dc)[0]
    assert Dc.G is not None                                   # formed along the way
    np.testing.assert_allclose(Zl, Z, atol=1e-10)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        Z1 = encode(Xt, Dt, lam)
        torch.set_num_threads(2)
        Z2 = encode(Xt, Dt, lam)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(Z1, Z2)
    monkeypatch.setattr(coding, "_BUCKET_WIDTH", 10 ** 9)    # one padded batch
    np.testing.assert_allclose(encode(Xt, Dt, lam), Z, atol=1e-10)


def test_warm_start_from_dense_wrong_codes():
    """A warm start whose support is mostly wrong (every atom positive, as a dense encoder's
    codes can be) still gives the exact codes, and no row ends worse than cold."""
    X, D = make_problem(150, 16, 64, 46, s=4)
    lam = 0.05
    Z = encode(X, D, lam)
    rng = np.random.default_rng(2)
    Zi, info = encode(X, D, lam, init=rng.uniform(0.01, 1.0, Z.shape), return_info=True)
    assert info.converged
    np.testing.assert_allclose(Zi, Z, atol=1e-9)
    np.testing.assert_allclose(objective(X, D, Zi, lam), objective(X, D, Z, lam), atol=1e-12)


def test_top_entries_per_row_counts():
    """The screening/violator selection takes each row's own number of largest entries,
    also past the fast topk width on some rows only (independent oracle: a full sort)."""
    from companion.coding import _TOPK_FAST, _top_entries
    g = torch.Generator().manual_seed(7)
    corr = torch.randn(50, 200, generator=g, dtype=torch.float64)
    nadd = torch.randint(1, 3 * _TOPK_FAST, (50,), generator=g)
    val, col = _top_entries(corr, nadd)
    assert val.shape[1] == int(nadd.max())
    order = corr.sort(dim=1, descending=True)
    for i, p in enumerate(nadd.tolist()):
        assert torch.equal(val[i, :p], order.values[i, :p])
        assert torch.equal(corr[i, col[i, :p]], val[i, :p])


def test_threads_restored_and_products_threaded_alike(monkeypatch):
    """encode runs its small kernels on one thread and restores torch's thread count; the
    codes are the same bits whether the dense products run on one thread or two."""
    import companion.coding as coding
    X, D = make_problem(400, 32, 160, 47, s=5)
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        Z2 = encode(Xt, Dt, 0.05)
        assert torch.get_num_threads() == 2
        seen = []
        real = coding.cpu_threads

        def spy(k):
            seen.append(k)
            return real(k)
        monkeypatch.setattr(coding, "cpu_threads", spy)
        Zs = encode(Xt, Dt, 0.05)
        assert 1 in seen and 2 in seen                  # kernels on one, products on two
        torch.set_num_threads(1)
        Z1 = encode(Xt, Dt, 0.05)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(Z1, Z2) and torch.equal(Zs, Z2)
