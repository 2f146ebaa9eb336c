"""Tests for companion.second_order: each closed form against an independent computation."""

import numpy as np
import pytest
import torch

import companion
from companion.coding import encode, nonneg_lasso_value
from companion.second_order import (atom_hessian, group_curvature, new_atom_bound, rotate_atom,
                                    split_atom, split_rate)

LAM = 0.7


def _stationary(X, D, lam, iters=20):
    """Centroid fixed-point iteration of T2: d_k <- normalise(sum_n z_nk e_n^(k))."""
    for _ in range(iters):
        Z = encode(X, D, lam)
        R = X - Z @ D
        S = Z.T @ R + (Z * Z).sum(0)[:, None] * D
        D = S / S.norm(dim=1, keepdim=True)
    return D, encode(X, D, lam)


@pytest.fixture(scope="module")
def clusters():
    """Three tight clusters along the axes of R^3: every point is coded by one atom alone."""
    g = companion.generator(0)
    X = torch.cat([1.5 * c + 0.2 * torch.randn(60, 3, generator=g, dtype=torch.float64)
                   for c in torch.eye(3, dtype=torch.float64)])
    D, Z = _stationary(X, torch.eye(3, dtype=torch.float64), LAM)
    return X, D, Z


def test_fixture_is_stationary_and_one_sparse(clusters):
    X, D, Z = clusters
    R = X - Z @ D
    t2 = Z.T @ R - LAM * Z.sum(0)[:, None] * D
    assert float(t2.abs().max()) < 1e-10
    assert int((Z > 0).sum(1).max()) == 1


def test_group_curvature_matches_autograd_hessian(clusters):
    X, D, Z = clusters
    for k in range(3):
        gc = group_curvature(X, D, LAM, k, Z)
        ah = atom_hessian(X, D, LAM, k, Z)
        assert gc.alone and ah.margin > 0
        assert torch.allclose(gc.hessian, ah.hessian, atol=1e-12)
        zk = Z[:, k]
        assert gc.mu == pytest.approx(float((zk * zk).sum() + LAM * zk.sum()))
        assert gc.gap > 0
        assert abs(float(gc.direction @ D[k])) < 1e-12


def test_hessian_matches_second_difference_of_value(clusters):
    X, D, Z = clusters
    h = 1e-3
    F0 = nonneg_lasso_value(X, D, LAM)
    for k in range(3):
        ah = atom_hessian(X, D, LAM, k, Z)
        u = ah.direction
        Fp = nonneg_lasso_value(X, rotate_atom(D, k, u, h), LAM)
        Fm = nonneg_lasso_value(X, rotate_atom(D, k, u, -h), LAM)
        assert (Fp + Fm - 2 * F0) / h**2 == pytest.approx(float(u @ ah.hessian @ u), rel=1e-4)


def test_atom_hessian_with_shared_supports():
    """Points coded by two atoms: the autograd Hessian still predicts the curvature of F.

    The normalisation retraction is second order, so this holds at any point, stationary or not.
    """
    g = companion.generator(1)
    C = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.2, 0.0, 1.0]], dtype=torch.float64)
    X = torch.cat([1.5 * c + 0.3 * torch.randn(60, 3, generator=g, dtype=torch.float64) for c in C])
    D, Z = _stationary(X, C / C.norm(dim=1, keepdim=True), 0.4, iters=10)
    assert int((Z > 0).sum(1).max()) >= 2
    F0, h = nonneg_lasso_value(X, D, 0.4), 1e-3
    for k in range(3):
        ah = atom_hessian(X, D, 0.4, k, Z)
        assert ah.margin > 0
        u = ah.direction
        Fp = nonneg_lasso_value(X, rotate_atom(D, k, u, h), 0.4)
        Fm = nonneg_lasso_value(X, rotate_atom(D, k, u, -h), 0.4)
        assert (Fp + Fm - 2 * F0) / h**2 == pytest.approx(ah.min_eigenvalue, rel=1e-3)


def test_saddle_detected():
    """Mirror-symmetric pair of groups coded by one atom: stationary, but a saddle when b^2 > a(a - lam)."""
    g = companion.generator(2)
    a = 1.0 + 0.1 * torch.rand(50, generator=g, dtype=torch.float64)
    b = 1.0 + 0.1 * torch.rand(50, generator=g, dtype=torch.float64)
    X = torch.cat([torch.stack([a, b], 1), torch.stack([a, -b], 1)])
    D = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    gc = group_curvature(X, D, 0.5, 0)
    assert gc.gap < 0
    F0 = nonneg_lasso_value(X, D, 0.5)
    assert nonneg_lasso_value(X, rotate_atom(D, 0, gc.direction, 1e-2), 0.5) < F0


def test_new_atom_bound_is_a_lower_bound(clusters):
    X, D, Z = clusters
    R = X - Z @ D
    n = int(R.norm(dim=1).argmax())
    u = R[n] / R[n].norm()
    bound = new_atom_bound(X, D, LAM, u, Z)
    assert bound > 0
    realised = nonneg_lasso_value(X, D, LAM) - nonneg_lasso_value(X, torch.cat([D, u[None]]), LAM)
    assert realised >= bound - 1e-12
    # a direction no residual reaches past lam adds nothing
    assert new_atom_bound(X, D, LAM, -D.sum(0), Z) == 0.0


def test_split_rate_is_the_first_order_decrease(clusters):
    X, D, Z = clusters
    spare = -D.sum(0) / D.sum(0).norm()
    D4 = torch.cat([D, spare[None]])
    F0 = nonneg_lasso_value(X, D4, LAM)
    assert F0 == pytest.approx(nonneg_lasso_value(X, D, LAM), abs=1e-14)
    k, u = 0, group_curvature(X, D, LAM, 0, Z).direction
    rate = split_rate(X, D, LAM, k, u, Z)
    assert rate > 0
    for eps in (1e-3, 1e-4):
        realised = F0 - nonneg_lasso_value(X, split_atom(D4, k, u, eps, spare=3), LAM)
        assert realised / eps == pytest.approx(rate, rel=20 * eps)


def test_numpy_in_numpy_out_and_float32(clusters):
    X, D, Z = clusters
    gc = group_curvature(X.numpy(), D.numpy(), LAM, 1)
    assert isinstance(gc.hessian, np.ndarray) and isinstance(gc.direction, np.ndarray)
    ah = atom_hessian(X.float(), D.float(), LAM, 1)
    assert ah.hessian.dtype == torch.float32
    assert isinstance(rotate_atom(D.numpy(), 0, np.array([0.0, 1.0, 0.0]), 0.1), np.ndarray)


def test_errors_name_the_parameter(clusters):
    X, D, Z = clusters
    with pytest.raises(ValueError, match="k must index an atom"):
        group_curvature(X, D, LAM, 5)
    with pytest.raises(TypeError, match="k must be an integer"):
        atom_hessian(X, D, LAM, 1.0)
    with pytest.raises(ValueError, match="lam"):
        new_atom_bound(X, D, -1.0, D[0])
    with pytest.raises(ValueError, match="u is parallel"):
        rotate_atom(D, 0, D[0], 0.1)
    with pytest.raises(ValueError, match="spare must differ"):
        split_atom(D, 0, D[1], 0.1, spare=0)
    with pytest.raises(ValueError, match="Z must be nonnegative"):
        split_rate(X, D, LAM, 0, D[1], -Z)
    with pytest.raises(ValueError, match="unit-norm"):
        group_curvature(X, 2 * D, LAM, 0)


def test_value_gradient_matches_forward_differences(clusters):
    from companion.second_order import value_gradient

    X, D, _ = clusters
    g = torch.Generator().manual_seed(3)
    E = torch.randn(D.shape, generator=g, dtype=torch.float64)
    E = E - (E * D).sum(1, keepdim=True) * D
    slope = float((value_gradient(X, D, LAM) * E).sum())
    errs = []
    for h in (1e-4, 1e-5):
        Dh = D + h * E
        fd = (nonneg_lasso_value(X, Dh / Dh.norm(dim=1, keepdim=True), LAM) - nonneg_lasso_value(X, D, LAM)) / h
        errs.append(abs(fd - slope))
    assert errs[1] < errs[0] / 5 + 1e-9          # first-order agreement: error linear in h


def test_minimize_on_spheres_reaches_the_fit_from_random_starts():
    from companion import fit_dictionary, match_atoms
    from companion.second_order import minimize_on_spheres

    g = torch.Generator().manual_seed(1)
    X = torch.randn(120, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5], dtype=torch.float64)
    fit = fit_dictionary(X, 3, 0.3, n_restarts=1, tol=1e-8, progress=False)
    run = minimize_on_spheres(X, torch.randn(3, 2, generator=g, dtype=torch.float64), 0.3)
    assert run.loss == pytest.approx(fit.loss, abs=1e-9)
    assert match_atoms(fit.D, run.D).min_cosine > 1 - 1e-8
    assert run.riemannian_gradient < 1e-7
    with pytest.raises(ValueError, match="lam"):
        minimize_on_spheres(X, fit.D, 0.0)
