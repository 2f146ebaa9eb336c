"""Tests for companion.certificates.certify (Chapter 2: T1, T2, duality; THEORY §3)."""

import json

import numpy as np
import pytest
import torch

from companion import huber_bound, joint_loss
from companion.certificates import CertificateReport, certify
from companion.coding import encode

from test_coding import make_problem  # shared problem generator


pytestmark = pytest.mark.usefixtures("one_thread")


def test_exact_codes_are_certified_and_loss_matches_joint_loss():
    X, D = make_problem(200, 12, 30, 0)
    lam = 0.1
    rep = certify(X, D, lam)
    assert isinstance(rep, CertificateReport) and rep.codes == "exact"
    assert rep.t1_violation <= 1e-6
    assert abs(rep.duality_gap) <= 1e-9
    Z = encode(X, D, lam)
    assert abs(rep.loss - joint_loss(X, D, Z, lam)) <= 1e-12
    assert rep.new_atom_gain >= 0


def test_perturbed_codes_are_flagged():
    X, D = make_problem(200, 12, 30, 1)
    lam = 0.1
    Z = encode(X, D, lam)
    rep = certify(X, D, lam, Z * 1.02)
    assert rep.t1_violation > 1e-3
    assert rep.duality_gap > 1e-6 and rep.relative_duality_gap > 1e-6
    Zn = Z.copy(); Zn[0, 0] = -0.5
    assert certify(X, D, lam, Zn).t1_violation >= 0.5


def test_random_dictionary_fails_t2_but_passes_t1():
    X, D = make_problem(300, 10, 20, 2)
    rng = np.random.default_rng(0)
    Dr = rng.standard_normal(D.shape); Dr /= np.linalg.norm(Dr, axis=1, keepdims=True)
    rep = certify(X, Dr, 0.1)
    assert rep.t1_violation <= 1e-6
    assert rep.t2_violation > 1e-2
    assert not rep.is_stationary()
    used = np.asarray(rep.usage) > 0
    assert np.nanmin(np.asarray(rep.centroid_cosine)[used]) < 0.99


def test_wide_limit_meets_huber_bound_and_t2():
    """One atom per datapoint (T4): codes ‖x‖-λ, loss = Huber bound, T2 holds exactly."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((15, 20)) * 2
    D = X / np.linalg.norm(X, axis=1, keepdims=True)
    lam = 0.3
    rep = certify(X, D, lam)
    assert abs(rep.loss - huber_bound(X, lam)) <= 1e-10
    assert rep.t1_violation <= 1e-8 and rep.t2_violation <= 1e-8
    assert rep.max_residual_norm <= lam + 1e-10
    assert rep.new_atom_gain <= 1e-20


def test_chunked_equals_unchunked():
    X, D = make_problem(157, 9, 25, 4)
    lam = 0.12
    Z = encode(X, D, lam)
    a = certify(X, D, lam, Z)
    b = certify(X, D, lam, Z, chunk_size=10)
    for f in ("loss", "t1_violation", "t2_violation", "duality_gap", "max_residual_norm",
              "new_atom_gain"):
        assert abs(getattr(a, f) - getattr(b, f)) <= 1e-10 * max(1, abs(getattr(a, f))), f
    np.testing.assert_allclose(a.atom_t2, b.atom_t2, atol=1e-10)
    np.testing.assert_allclose(a.usage, b.usage)
    assert a.dead_atoms == b.dead_atoms
    c = certify(X, D, lam, chunk_size=13)      # exact codes computed chunk by chunk
    assert abs(c.loss - a.loss) <= 1e-9


def test_dead_atom_strict_local_minimum_flag():
    X, D = make_problem(100, 8, 12, 5)
    X = np.abs(X)                               # nonnegative data
    away = -np.ones((1, 8)) / np.sqrt(8)        # points away from every datum
    D2 = np.vstack([D, away])
    rep = certify(X, D2, 0.1)
    assert 12 in rep.dead_atoms
    assert rep.dead_atoms_strict[rep.dead_atoms.index(12)] is True
    assert np.isnan(np.asarray(rep.centroid_cosine)[12])


def test_new_atom_gain_is_a_guaranteed_decrease():
    """§3: adding u lowers the loss by at least (1/2N) Σ (uᵀr - λ)₊²."""
    X, D = make_problem(200, 10, 12, 6)
    lam = 0.1
    Dm = D[:6]                                   # half the generating atoms are missing
    rep = certify(X, Dm, lam)
    assert rep.new_atom_gain > 1e-3 and rep.new_atom_excess > 0
    u = np.asarray(rep.new_atom)
    assert abs(np.linalg.norm(u) - 1) <= 1e-12
    rep2 = certify(X, np.vstack([Dm, u[None]]), lam)
    assert rep2.loss <= rep.loss - rep.new_atom_gain + 1e-12


def test_report_kinds_serialisation_and_summary():
    X, D = make_problem(50, 6, 9, 7)
    rep = certify(X, D, 0.1)
    assert isinstance(rep.usage, np.ndarray) and rep.usage.shape == (9,)
    s = json.dumps(rep.to_dict())
    assert "t2_violation" in s
    text = str(rep)
    assert "T1 violation" in text and "T2 violation" in text and "e-" in text
    rt = certify(torch.from_numpy(X).float(), torch.from_numpy(D).float(), 0.1)
    assert isinstance(rt.usage, torch.Tensor) and rt.usage.dtype == torch.float32
    assert rt.t1_violation <= 1e-3
    json.dumps(rt.to_dict())


def test_input_errors():
    X, D = make_problem(20, 6, 9, 8)
    with pytest.raises(ValueError, match="rescale the codes"):
        certify(X, 3 * D, 0.1)
    Dz = D.copy(); Dz[1] = 0
    with pytest.raises(ValueError, match="D has zero-norm"):
        certify(X, Dz, 0.1)
    with pytest.raises(ValueError, match="lam"):
        certify(X, D, 0)
    with pytest.raises(ValueError, match="Z must have shape"):
        certify(X, D, 0.1, np.zeros((20, 8)))
    Zi = np.zeros((20, 9)); Zi[0, 0] = np.inf
    with pytest.raises(ValueError, match="Z"):
        certify(X, D, 0.1, Zi)
    with pytest.raises(ValueError, match="tol_active"):
        certify(X, D, 0.1, tol_active=-1)
    with pytest.raises(TypeError, match="Z"):
        certify(X, D, 0.1, np.zeros((20, 9), dtype=np.float32))


def test_huber_bound_and_gap_are_reported_and_name_the_verdict():
    """T4: huber_gap = loss - mean h_λ(‖x‖) ≥ 0; zero (and named) only in the wide limit."""
    X, D = make_problem(200, 12, 30, 0)
    lam = 0.1
    rep = certify(X, D, lam)
    assert rep.huber_bound == pytest.approx(huber_bound(X, lam), rel=1e-12)
    assert rep.huber_gap == pytest.approx(rep.loss - rep.huber_bound, abs=1e-15)
    assert rep.huber_gap > 1e-3
    assert "optim" not in rep.verdict
    rng = np.random.default_rng(3)
    W = rng.standard_normal((15, 20)) * 2
    wide = certify(W, W / np.linalg.norm(W, axis=1, keepdims=True), 0.3)
    assert abs(wide.huber_gap) <= 1e-10
    assert wide.verdict == "global optimum (T4 Huber bound met)"
    # signed codes can go below the bound (it needs Z >= 0): never called a global optimum
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    Zs = np.diag(np.linalg.norm(W, axis=1) - 0.3)
    Zs[0, 1] = -0.5
    signed = certify(W, Wn, 0.3, Zs)
    assert signed.huber_gap < 0 and not signed.verdict.startswith("global optimum")


def test_stationary_point_verdict_says_stationary_not_optimal():
    """A stationary dictionary from fit_dictionary: the verdict is 'certified stationary point'."""
    from companion import fit_dictionary
    X, _ = make_problem(120, 6, 8, 11)
    fit = fit_dictionary(X, 4, 0.1, seed=0, tol=1e-8)
    rep = certify(X, fit.D, 0.1)
    assert rep.is_stationary(1e-6)
    assert rep.verdict.startswith("certified stationary point") and "global" in rep.verdict
    assert "optimum" not in rep.verdict.replace("not certified global", "")


def test_bias_is_subtracted_and_its_stationarity_checked():
    X, D = make_problem(150, 8, 10, 12)
    lam = 0.1
    b = np.linspace(-1, 1, 8)
    shifted = certify(X + b, D, lam, bias=b)
    plain = certify(X, D, lam)
    assert shifted.loss == pytest.approx(plain.loss, rel=1e-10)
    assert plain.bias_stationarity is None
    Z = encode(X, D, lam)
    mean_r = (X - Z @ D).mean(0)
    assert shifted.bias_stationarity == pytest.approx(np.linalg.norm(mean_r), rel=1e-8)
    # moving the bias onto the mean residual's zero: the check passes for a bias that is stationary
    # in the one-atom wide limit (every residual λ x/‖x‖ of a symmetric data set sums to zero)
    S = np.vstack([np.eye(3) * 2, -np.eye(3) * 2])
    rep = certify(S + 5.0, np.vstack([np.eye(3), -np.eye(3)]), 0.3, bias=np.full(3, 5.0))
    assert rep.bias_stationarity <= 1e-12 and rep.verdict.startswith("global optimum")
    with pytest.raises(ValueError, match="bias must have shape"):
        certify(X, D, lam, bias=np.zeros(3))


def test_l0_fvu_and_t1_in_units_of_lam():
    X, D = make_problem(100, 8, 12, 13)
    lam = 0.2
    Z = encode(X, D, lam)
    rep = certify(X, D, lam, Z * 1.1)
    R = X - 1.1 * Z @ D
    assert rep.l0 == pytest.approx((Z > 0).sum(1).mean())
    assert rep.fvu == pytest.approx((R ** 2).sum() / ((X - X.mean(0)) ** 2).sum(), rel=1e-10)
    assert rep.t1_violation_lam == pytest.approx(rep.t1_violation / lam)
    assert rep.codes == "given"


def test_vacuous_inputs_and_non_numbers_are_refused():
    X, D = make_problem(20, 6, 9, 8)
    with pytest.raises(ValueError, match="X has no rows"):
        certify(X[:0], D, 0.1)
    with pytest.raises(ValueError, match="D has no atoms"):
        certify(X, D[:0], 0.1)
    for bad in ("0.1", True):
        with pytest.raises(TypeError, match="lam must be a positive number"):
            certify(X, D, bad)


def test_all_atoms_dead_is_called_vacuous():
    X, D = make_problem(30, 6, 9, 9)
    big = 1e3
    rep = certify(X, D, big)
    assert len(rep.dead_atoms) == 9
    assert "vacuously" in rep.verdict or rep.verdict.startswith("global optimum")
    # every point below λ in norm: the Huber bound ½‖x‖² is met with Z = 0, a true global optimum
    assert rep.verdict.startswith("global optimum")
    D2 = np.vstack([-np.abs(D[:1]) / np.linalg.norm(D[:1])])
    Xp = np.abs(X) * 10
    rep2 = certify(Xp, D2, 0.1)
    assert rep2.dead_atoms == [0] and "vacuously" in rep2.verdict
