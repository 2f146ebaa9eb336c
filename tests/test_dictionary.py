"""Tests for companion.dictionary.fit_dictionary (Chapter 2: T1–T2 at the learned optimum)."""

import numpy as np
import pytest
import torch

from companion import huber_bound, joint_loss
from companion.certificates import certify
from companion.dictionary import DictionaryFit, fit_dictionary

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
