"""Tests for companion.dictionary.fit_dictionary (Chapter 2: T1–T2 at the learned optimum)."""

import warnings

import numpy as np
import pytest
import torch

from companion import ConvergenceWarning, encode, huber_bound, joint_loss
from companion.certificates import certify
from companion.dictionary import DictionaryFit, fit_dictionary
from companion.runtime import cpu_threads

from test_coding import make_problem


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_reaches_certified_stationary_point():
    X, _ = make_problem(200, 8, 10, 0, s=2)
    fit = fit_dictionary(X, 10, 0.1, n_restarts=2, progress=False)
    assert isinstance(fit, DictionaryFit) and fit.converged
    assert isinstance(fit.D, np.ndarray) and fit.D.shape == (10, 8)
    np.testing.assert_allclose(np.linalg.norm(fit.D, axis=1), 1, atol=1e-12)
    # independent re-certification with freshly computed exact codes
    rep = certify(X, fit.D, 0.1)
    assert rep.t1_violation <= 1e-6 and rep.t2_violation <= 1e-6
    assert abs(rep.loss - fit.loss) <= 1e-9
    assert abs(joint_loss(X, fit.D, fit.Z, 0.1) - fit.loss) <= 1e-12
    assert fit.loss >= huber_bound(X, 0.1) - 1e-12          # T4 lower bound
    assert len(fit.restart_losses) == 2 and fit.loss == min(fit.restart_losses)
    # the loss history is monotone (safeguarded extrapolation)
    h = np.array(fit.history)
    assert np.all(np.diff(h) <= 1e-12)
    # T2 in centroid form: d_k = Σ z e / (‖z‖² + λ‖z‖₁) for used atoms
    Z, D = fit.Z, fit.D
    R = X - Z @ D
    for k in np.nonzero(Z.sum(0) > 0)[0][:3]:
        E = R + np.outer(Z[:, k], D[k])
        c = Z[:, k] @ E / (Z[:, k] @ Z[:, k] + 0.1 * Z[:, k].sum())
        np.testing.assert_allclose(c, D[k], atol=1e-5)


def test_fit_beats_random_dictionary_and_given_init_and_torch():
    X, Dtrue = make_problem(150, 6, 8, 1, s=2)
    Xt = torch.from_numpy(X)
    fit = fit_dictionary(Xt, 8, 0.1, init=torch.from_numpy(Dtrue) * 2.0, progress=False)
    assert isinstance(fit.D, torch.Tensor) and fit.D.dtype == torch.float64
    assert fit.converged and fit.certificate.t2_violation <= 1e-6
    rng = np.random.default_rng(0)
    Dr = rng.standard_normal((8, 6)); Dr /= np.linalg.norm(Dr, axis=1, keepdims=True)
    assert fit.loss < certify(X, Dr, 0.1).loss


def test_codes_are_exact_even_when_stopped_early():
    """Early iterations use partial codes; a fit stopped there (max_iter, or a loose tol)
    still returns exact codes for its dictionary, and its loss is theirs."""
    X, _ = make_problem(300, 8, 16, 5, s=3)
    for kwargs in ({"max_iter": 2}, {"tol": 0.5}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)     # max_iter=2 warns
            fit = fit_dictionary(X, 16, 0.05, n_restarts=1, progress=False, **kwargs)
        assert fit.certificate.t1_violation <= 1e-6
        assert abs(joint_loss(X, fit.D, fit.Z, 0.05) - fit.loss) <= 1e-12
        assert abs(certify(X, fit.D, 0.05).loss - fit.loss) <= 1e-9


def test_float32_runs():
    X, _ = make_problem(100, 6, 6, 2, s=2, dtype=np.float32)
    fit = fit_dictionary(X, 6, 0.1, n_restarts=1, progress=False, tol=1e-3, max_iter=200)
    assert fit.D.dtype == np.float32
    assert fit.certificate.t1_violation <= 1e-3


def test_dead_atoms_are_resampled():
    X, _ = make_problem(120, 6, 4, 3, s=1)
    X = np.abs(X)
    D0 = np.vstack([np.abs(np.random.default_rng(1).standard_normal((3, 6))),
                    -np.ones((1, 6))])                   # last atom starts dead
    D0 /= np.linalg.norm(D0, axis=1, keepdims=True)
    assert 3 in certify(X, D0, 0.1).dead_atoms
    fit = fit_dictionary(X, 4, 0.1, init=D0, progress=False)
    assert 3 not in fit.certificate.dead_atoms
    off = fit_dictionary(X, 4, 0.1, init=D0, progress=False, resample_dead=False)
    assert fit.loss < off.loss


def test_input_errors():
    X, _ = make_problem(20, 5, 5, 4)
    with pytest.raises(ValueError, match="lam"):
        fit_dictionary(X, 4, 0, progress=False)
    with pytest.raises(ValueError, match="n_atoms"):
        fit_dictionary(X, 0, 0.1, progress=False)
    with pytest.raises(ValueError, match="init"):
        fit_dictionary(X, 4, 0.1, init="bogus", progress=False)
    with pytest.raises(ValueError, match="init"):
        fit_dictionary(X, 4, 0.1, init=np.ones((3, 5)), progress=False)
    with pytest.raises(ValueError, match="n_atoms"):
        fit_dictionary(X, 40, 0.1, progress=False)


def test_quasi_newton_matches_block_sweeps_and_a_danskin_check():
    """The L-BFGS phase and the plain alternating minimisation (a different algorithm) reach
    certified stationary points from the same start; forward finite differences of the value
    function F along a tangent direction agree with the Danskin gradient at the result."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 6)) * np.array([1.0, 0.8, 0.6, 0.5, 0.4, 0.3])
    qn = fit_dictionary(X, 8, 0.3, n_restarts=1, progress=False)
    sw = fit_dictionary(X, 8, 0.3, n_restarts=1, progress=False, method="sweeps", max_iter=20000)
    assert qn.converged and sw.converged and qn.message == "converged"
    assert qn.certificate.t2_violation <= 1e-6 and sw.certificate.t2_violation <= 1e-6
    assert qn.n_iter < sw.n_iter
    # the loss never rises (Armijo line search; safeguarded sweeps before it)
    assert np.all(np.diff(np.array(qn.history)) <= 1e-12)
    # forward differences of F(normalise(D + h U)) against <grad, U> at a non-stationary D
    D = qn.D + 0.05 * rng.standard_normal(qn.D.shape)
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    U = rng.standard_normal(D.shape)
    U -= (U * D).sum(1, keepdims=True) * D
    F0 = certify(X, D, 0.3).loss
    Z = encode(X, D, 0.3)
    G = -(Z.T @ (X - Z @ D)) / X.shape[0]
    h = 1e-6
    Dh = D + h * U
    Dh /= np.linalg.norm(Dh, axis=1, keepdims=True)
    fd = (certify(X, Dh, 0.3).loss - F0) / h
    assert abs(fd - (G * U).sum()) <= 1e-4 * max(1.0, abs(fd))


def test_fit_bias_is_stationary_and_beats_fixed_centrings():
    """With fit_bias the mean residual vanishes, and a generic optimiser over b at the fitted
    dictionary (BFGS on finite-difference gradients of F_b, an independent method) finds no
    lower loss; the data mean and b = 0 are worse."""
    import scipy.optimize
    from companion import nonneg_lasso_value
    X, _ = make_problem(200, 5, 6, 11, s=2)
    X = X + np.array([2.0, -1.0, 0.5, 0.0, 1.5])
    fit = fit_dictionary(X, 6, 0.2, n_restarts=1, progress=False, fit_bias=True)
    assert fit.converged and isinstance(fit.bias, np.ndarray) and fit.bias.shape == (5,)
    R = X - fit.bias - fit.Z @ fit.D
    assert np.linalg.norm(R.mean(0)) <= 1e-6
    assert abs(joint_loss(X - fit.bias, fit.D, fit.Z, 0.2) - fit.loss) <= 1e-12

    def F(b):
        return nonneg_lasso_value(X - b, fit.D, 0.2)
    assert fit.loss <= F(X.mean(0)) + 1e-12 and fit.loss < F(np.zeros(5))
    opt = scipy.optimize.minimize(F, X.mean(0), method="BFGS", options={"gtol": 1e-9})
    assert opt.fun >= fit.loss - 1e-9
    np.testing.assert_allclose(opt.x, fit.bias, atol=1e-4)
    # a fixed centring (b = 0, the default) gives no bias and a higher loss
    plain = fit_dictionary(X, 6, 0.2, n_restarts=1, progress=False)
    assert plain.bias is None and plain.loss > fit.loss


def test_unconverged_fit_warns_and_says_so():
    X, _ = make_problem(300, 8, 16, 5, s=3)
    with pytest.warns(ConvergenceWarning, match="max_iter=3"):
        fit = fit_dictionary(X, 16, 0.05, n_restarts=1, progress=False, max_iter=3)
    assert not fit.converged and "max_iter=3" in fit.message and "T2 =" in fit.message
    with pytest.warns(ConvergenceWarning, match="time_limit"):
        fit = fit_dictionary(X, 16, 0.05, n_restarts=1, progress=False, time_limit=1e-9)
    assert not fit.converged and "time_limit" in fit.message


def test_fits_are_bitwise_reproducible_across_thread_counts():
    """What is guaranteed about threads, on one CPU: with the fit's default one-thread policy
    the bits do not depend on torch's thread setting (n·d is above torch's parallel grain, so
    the reductions would be split where a kernel splits them); with ``n_threads=None`` the
    fit runs on torch's setting, whose reductions split by thread count (and, for MKL, by
    load), so one and two threads agree to rounding only (measured: 8e-16 in D here)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2112, 16, generator=g, dtype=torch.float64) + 0.3
    fits = {}
    for threads in (1, 2):
        with cpu_threads(threads):
            for n_threads in (1, None):
                with pytest.warns(ConvergenceWarning):
                    fits[threads, n_threads] = fit_dictionary(
                        X, 24, 0.2, n_restarts=1, progress=False, max_iter=4, fit_bias=True,
                        n_threads=n_threads)
                assert torch.get_num_threads() == threads     # the fit restores the setting
    assert _bits(fits[1, 1]) == _bits(fits[2, 1]) == _bits(fits[1, None])
    loose = fits[2, None]
    assert torch.allclose(loose.D, fits[1, 1].D, rtol=0, atol=1e-10)
    assert loose.loss == pytest.approx(fits[1, 1].loss, rel=1e-12)


def _bits(fit):
    """Everything a fit returns that must repeat bit for bit."""
    return fit.D.numpy().tobytes(), fit.bias.numpy().tobytes(), fit.loss, fit.history


def test_dense_newton_fits_are_bitwise_reproducible_across_thread_counts():
    """The dense Newton path (its Hessian assembled by products over all rows, n·d above
    torch's parallel grain) gives the same bits whatever torch's thread setting, on the
    fit's default one thread."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4224, 8, generator=g, dtype=torch.float64) + 0.3
    out = []
    for threads in (1, 2):
        with cpu_threads(threads), pytest.warns(ConvergenceWarning):
            out.append(_bits(fit_dictionary(X, 12, 0.2, n_restarts=1, progress=False, max_iter=12,
                                            fit_bias=True, method="newton")))
    assert out[0] == out[1]


def test_new_argument_errors():
    X, _ = make_problem(20, 5, 5, 4)
    with pytest.raises(ValueError, match="method"):
        fit_dictionary(X, 4, 0.1, method="bfgs", progress=False)
    with pytest.raises(ValueError, match="init_bias"):
        fit_dictionary(X, 4, 0.1, init_bias=np.zeros(5), progress=False)
    with pytest.raises(ValueError, match="init_bias"):
        fit_dictionary(X, 4, 0.1, fit_bias=True, init_bias=np.zeros(4), progress=False)
    with pytest.raises(ValueError, match="n_threads"):
        fit_dictionary(X, 4, 0.1, n_threads=0, progress=False)


@pytest.mark.parametrize("fit_bias", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_newton_hessian_matches_finite_differences_of_the_gradient(fit_bias, dense):
    """The fixed-support Riemannian Hessian of the Newton phase (matrix-free, and the dense
    matrix of small problems) against forward differences of the Danskin gradient along
    the retraction (exact codes recomputed by encode at the moved point, an independent
    evaluation), and its symmetry; the dense matrix applied to a vector is the matrix-free
    product (an identity between the two assemblies)."""
    from companion.dictionary import _Fit
    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, 6, generator=g, dtype=torch.float64) + (0.5 if fit_bias else 0.0)
    D = torch.randn(8, 6, generator=g, dtype=torch.float64)
    D /= D.norm(dim=1, keepdim=True)
    b = 0.7 * X.mean(0) if fit_bias else None
    f = _Fit(X, D, b, lam=0.3, tol=1e-6, max_iter=10, n_sweeps=3, etol=1e-12, chunk_size=4096,
             resample_dead=False, extrapolate=True, progress=False, time_limit=None,
             callback=None, method="newton", label="")
    f.exact = True
    Z, loss, R, G, M, zsum, V = f.evaluate(D, b, None)
    hv = f.hessian_model(D, b, Z, R, G)
    P = f.tangent(D, torch.randn(G.shape, generator=g, dtype=torch.float64))
    Q = f.tangent(D, torch.randn(G.shape, generator=g, dtype=torch.float64))
    if dense:
        H = f.dense_hessian(D, b, Z, R, G)
        assert float((H - H.T).abs().max()) <= 1e-12
        assert float(((H @ P.reshape(-1)).view_as(P) - hv(P)).abs().max()) <= 1e-12
        hv = lambda U: (H @ U.reshape(-1)).view_as(U)   # noqa: E731
    HP = hv(P)
    assert abs(float((Q * HP).sum()) - float((P * hv(Q)).sum())) <= 1e-10
    h = 1e-6
    Dn, bn = f.retract(D, b, P, h)
    Zn = encode(X if bn is None else X - bn, Dn, 0.3, tol=1e-12)
    Rn = (X if bn is None else X - bn) - Zn @ Dn
    Gn = -(Zn.T @ Rn) / X.shape[0]
    if fit_bias:
        Gn = torch.cat([Gn, -Rn.mean(0, keepdim=True)])
    fd = float((Q * (f.tangent(Dn, Gn) - f.tangent(D, G))).sum()) / h
    assert abs(fd - float((Q * HP).sum())) <= 1e-4 * max(1.0, abs(fd))


def test_warm_exact_codes_equal_encode():
    """The Newton phase's warm codes (old supports re-solved, KKT-checked, the rest sent to
    encode) are encode's codes at the moved dictionary."""
    from companion.dictionary import _Fit
    X, _ = make_problem(400, 8, 16, 9, s=3)
    Xt = torch.from_numpy(X)
    D = torch.from_numpy(np.eye(16, 8) + 0.3)
    D = D / D.norm(dim=1, keepdim=True)
    f = _Fit(Xt, D, None, lam=0.05, tol=1e-6, max_iter=10, n_sweeps=3, etol=1e-8,
             chunk_size=4096, resample_dead=False, extrapolate=True, progress=False,
             time_limit=None, callback=None, method="newton", label="")
    f.exact = True
    Z0 = torch.from_numpy(encode(X, D.numpy(), 0.05))
    for step in (1e-4, 1e-2, 0.3):
        Dn = D + step * torch.randn(D.shape, generator=torch.Generator().manual_seed(1),
                                    dtype=torch.float64)
        Dn = Dn / Dn.norm(dim=1, keepdim=True)
        Zw = f.enc(Xt, Dn, Z0)
        Ze = torch.from_numpy(encode(X, Dn.numpy(), 0.05))
        assert float((Zw - Ze).abs().max()) <= 1e-7


def test_finish_best_restart_screens_and_lbfgs_still_certifies():
    """finish_restarts='best' (Newton) finishes only the restart lowest at the T2 = 1e-2
    screen: it reports every restart's loss, ends at a certified stationary point whose loss
    is the lowest of them, and is the same fit as that restart run alone to the end. The
    default L-BFGS method (another algorithm) also reaches a certified stationary point, and
    Newton does with a fitted bias."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 6)) * np.array([1.0, 0.8, 0.6, 0.5, 0.4, 0.3])
    fit = fit_dictionary(X, 8, 0.3, n_restarts=3, progress=False, finish_restarts="best",
                         method="newton")
    assert fit.converged and fit.certificate.t2_violation <= 1e-6
    assert len(fit.restart_losses) == 3 and fit.loss == min(fit.restart_losses)
    r = int(np.argmin(fit.restart_losses))
    alone = fit_dictionary(X, 8, 0.3, n_restarts=1, seed=r, progress=False, method="newton")
    assert alone.loss == fit.loss and np.array_equal(alone.D, fit.D)
    qn = fit_dictionary(X, 8, 0.3, n_restarts=1, progress=False)       # L-BFGS
    assert qn.converged and qn.certificate.t2_violation <= 1e-6
    # with a fitted bias, Newton reaches a stationary (b, D) too
    Xb = X + np.array([1.0, -2.0, 0.5, 0.0, 0.3, 1.0])
    nb = fit_dictionary(Xb, 8, 0.3, n_restarts=1, progress=False, method="newton", fit_bias=True)
    assert nb.converged and nb.certificate.t2_violation <= 1e-6
    assert np.linalg.norm((Xb - nb.bias - nb.Z @ nb.D).mean(0)) <= 1e-6
    with pytest.raises(ValueError, match="finish_restarts"):
        fit_dictionary(X, 8, 0.3, progress=False, finish_restarts="first")


def test_dense_newton_from_a_far_start_against_a_generic_solver():
    """Small problems take dense Newton steps. From a random start far from any stationary
    point the Newton fit (dense Cholesky step) reaches a certified stationary point; its
    step solves the damped Newton system; and scipy's BFGS on the unconstrained
    parametrisation D = W/‖W‖ (Danskin gradients by encode, a generic method), started at
    the fit, finds no lower loss."""
    import scipy.optimize
    from companion.dictionary import _DENSE_DIM, _Fit
    rng = np.random.default_rng(7)
    X = rng.standard_normal((300, 6)) * np.array([1.0, 0.8, 0.6, 0.5, 0.4, 0.3])
    assert 8 * 6 <= _DENSE_DIM
    fit = fit_dictionary(X, 8, 0.3, n_restarts=1, init="random", seed=4, progress=False,
                         method="newton")
    assert fit.converged and certify(X, fit.D, 0.3).t2_violation <= 1e-6
    # the dense step solves (Hess + mu diag(M)) p = -g on the tangent space
    Xt = torch.from_numpy(X)
    D = torch.from_numpy(fit.D) + 0.1 * torch.from_numpy(rng.standard_normal((8, 6)))
    D /= D.norm(dim=1, keepdim=True)
    f = _Fit(Xt, D, None, lam=0.3, tol=1e-6, max_iter=10, n_sweeps=3, etol=1e-12,
             chunk_size=4096, resample_dead=False, extrapolate=True, progress=False,
             time_limit=None, callback=None, method="newton", label="")
    f.exact = True
    Z, loss, R, G, M, zsum, V = f.evaluate(D, None, None)
    g = f.tangent(D, G)
    hv = f.hessian_model(D, None, Z, R, G)
    H = f.dense_hessian(D, None, Z, R, G)
    p = f.dense_solve(D, H, M, 10.0, g)
    assert p is not None and float((p * D).sum(1).abs().max()) <= 1e-12
    res = hv(p) + 10.0 * M.unsqueeze(1) * p + g
    assert float(res.abs().max()) <= 1e-10 * float(g.abs().max())

    def value_and_grad(w):
        W = w.reshape(8, 6)
        nrm = np.linalg.norm(W, axis=1, keepdims=True)
        Dw = W / nrm
        Zw = encode(X, Dw, 0.3, tol=1e-12)
        Rw = X - Zw @ Dw
        F = float(np.mean(0.5 * (Rw * Rw).sum(1) + 0.3 * Zw.sum(1)))
        Gd = -(Zw.T @ Rw) / X.shape[0]
        Gw = (Gd - (Gd * Dw).sum(1, keepdims=True) * Dw) / nrm
        return F, Gw.ravel()
    opt = scipy.optimize.minimize(value_and_grad, fit.D.ravel(), jac=True, method="BFGS",
                                  options={"gtol": 1e-10})
    assert opt.fun >= fit.loss - 1e-10


def _fit_state(X, D, b, lam, method="newton"):
    """A ``_Fit`` with exact codes on, for tests of its pieces."""
    from companion.dictionary import _Fit
    f = _Fit(X, D, b, lam=lam, tol=1e-6, max_iter=10, n_sweeps=3, etol=1e-12, chunk_size=4096,
             resample_dead=False, extrapolate=True, progress=False, time_limit=None,
             callback=None, method=method, label="")
    f.exact = True
    return f


@pytest.mark.parametrize("fit_bias", [False, True])
def test_sparse_code_products_match_the_dense_ones(monkeypatch, fit_bias):
    """Sparse codes are multiplied through a CSR copy (large, sparse problems): the loss, the
    Danskin gradient and the Newton Hessian product (supports sampled by sampled_addmm)
    agree with the dense products to rounding on the same point."""
    import companion.dictionary as cd
    X, D = make_problem(600, 24, 96, 5, s=3)
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    b = 0.1 * Xt.mean(0) if fit_bias else None
    f = _fit_state(Xt, Dt, b, 0.05)
    Z, loss, R, G, M, zsum, V = f.evaluate(Dt, b, None)
    assert cd._products(Z) is Z                         # 57,600 entries: dense by default
    hv = f.hessian_model(Dt, b, Z, R, G)
    monkeypatch.setattr(cd, "_SPARSE_MIN", 0)
    assert cd._products(Z).layout == torch.sparse_csr
    Z2, loss2, R2, G2, *_ = f.evaluate(Dt, b, None)
    hv2 = f.hessian_model(Dt, b, Z, R, G)
    assert torch.equal(Z, Z2) and abs(loss - loss2) <= 1e-13
    assert float((G - G2).abs().max()) <= 1e-14
    P = f.tangent(Dt, torch.randn(G.shape, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64))
    assert float((hv(P) - hv2(P)).abs().max()) <= 1e-12 * float(hv(P).abs().max())


def test_long_supports_are_factorised_in_groups_and_stay_exact():
    """Long supports (here 24 atoms or more) are factorised in groups of rows of similar size: every
    row appears in exactly one group with its own support, and the Newton phase's warm
    codes from them (old supports re-solved at a moved dictionary) are encode's codes."""
    from companion.dictionary import _support_systems
    X, D = make_problem(300, 64, 128, 2, s=30, noise=0.02)
    Xt, Dt = torch.from_numpy(X), torch.from_numpy(D)
    Z = torch.from_numpy(encode(X, D, 0.02))
    counts = (Z > 0).sum(1)
    assert int(counts.max()) >= 24 and int(counts.min()) < int(counts.max())
    seen = torch.zeros(300, dtype=torch.long)
    widths = set()
    for rows, ic, L, ok in _support_systems(Z, Dt, 1e-12):
        seen[rows] += 1
        widths.add(ic.shape[1])
        assert bool(ok.all())
        for r, i in zip(rows.tolist(), ic):
            assert i[i < 128].tolist() == torch.nonzero(Z[r] > 0).flatten().tolist()
    assert bool((seen == 1).all()) and len(widths) > 1
    f = _fit_state(Xt, Dt, None, 0.02)
    Dn = Dt + 1e-3 * torch.randn(Dt.shape, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64)
    Dn = Dn / Dn.norm(dim=1, keepdim=True)
    Ze = torch.from_numpy(encode(X, Dn.numpy(), 0.02, tol=1e-12))
    assert float((f.warm_exact(Xt, Dn, Z) - Ze).abs().max()) <= 1e-8


def test_stalled_sweeps_hand_over_to_the_quasi_newton_phase(monkeypatch):
    """With the hand-over threshold out of reach, the block sweeps' codes never become exact,
    so only the stall rule (T2 not halved in ``_STALL`` sweeps) can start the L-BFGS phase;
    the fit still ends at a certified stationary point, after the switch."""
    import companion.dictionary as cd
    monkeypatch.setattr(cd, "_EXACT_BELOW_QN", 0.0)
    monkeypatch.setattr(cd, "_STALL", 2)
    at_switch = []
    lbfgs = cd._Fit.lbfgs_phase
    monkeypatch.setattr(cd._Fit, "lbfgs_phase",
                        lambda self: (at_switch.append(self.t2h[-1]), lbfgs(self))[1])
    X, _ = make_problem(200, 8, 10, 0, s=2)
    fit = fit_dictionary(X, 10, 0.1, n_restarts=1, progress=False, tol=1e-7, n_sweeps=1,
                         extrapolate=False)
    assert len(at_switch) == 1 and at_switch[0] > 1e3 * 1e-7     # not the tolerance's switch
    assert fit.converged and certify(X, fit.D, 0.1).t2_violation <= 1e-7


def test_a_dead_atom_is_not_reseeded_below_the_rounding_of_the_loss():
    """More atoms than directions (Chapter 6's rays: K = 5 for m = 4): one atom stays dead at
    the optimum, and its best replacement there gains less than the rounding level of the
    loss. The fit must not keep re-seeding it (that reset L-BFGS every iteration and ran to
    max_iter); it ends at a certified stationary point on the Huber bound (T4)."""
    from companion.runtime import generator
    g = generator(0)
    rays = torch.randn(5, 8, generator=g, dtype=torch.float64)
    rays = rays / rays.norm(dim=1, keepdim=True)
    ray_of = torch.arange(60) % 5
    norms = 0.6 + 1.4 * torch.rand(60, generator=g, dtype=torch.float64)
    short = ray_of == 4
    norms[short] = 0.05 + 0.4 * torch.rand(int(short.sum()), generator=g, dtype=torch.float64)
    X = norms[:, None] * rays[ray_of]
    fit = fit_dictionary(X, 5, 0.5, n_restarts=1, seed=0, progress=False)
    assert fit.converged and fit.n_iter < 100
    assert fit.certificate.t2_violation <= 1e-6
    assert abs(fit.loss - huber_bound(X, 0.5)) <= 1e-9
