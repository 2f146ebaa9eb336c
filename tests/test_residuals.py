"""Tests of companion.residuals: constructed cases whose residual structure is known exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from companion.residuals import (
    amortisation_split,
    atom_mean_residuals,
    linear_predictability,
    split_residuals,
)

LAM = 0.3


def orthonormal_case(n=50, d=5, k=3, seed=0):
    """Atoms e_0..e_{k-1}: exact codes are (x_k - λ)_+, so every part is known in closed form."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    D = torch.eye(d, dtype=torch.float64)[:k]
    Z = torch.clamp(X[:, :k] - LAM, min=0)
    return X, D, Z


def test_orthonormal_dictionary_closed_form():
    X, D, Z = orthonormal_case()
    sp = split_residuals(X, D, Z, LAM)
    active = Z > 0
    expected_support = torch.zeros_like(X)
    expected_support[:, :3] = LAM * active.double()
    assert torch.allclose(sp.support_part, expected_support, atol=1e-12)
    assert float(sp.on_span_deviation.abs().max()) < 1e-12
    expected_orth = X - Z @ D - expected_support
    assert torch.allclose(sp.orthogonal_part, expected_orth, atol=1e-12)
    assert torch.equal(sp.support_size, active.sum(1))
    total = float(((X - Z @ D) ** 2).sum())
    assert sp.support_share == pytest.approx(float((expected_support ** 2).sum()) / total, abs=1e-12)
    assert sp.support_share + sp.orthogonal_share == pytest.approx(1.0, abs=1e-12)
    assert sp.span_share == pytest.approx(sp.support_share, abs=1e-12)


def test_parts_sum_to_residual_and_orthogonal_part_is_orthogonal_to_active_atoms():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    D = torch.randn(8, 6, generator=g, dtype=torch.float64)
    D = D / D.norm(dim=1, keepdim=True)
    Z = torch.rand(40, 8, generator=g, dtype=torch.float64) * (torch.rand(40, 8, generator=g) < 0.3)
    sp = split_residuals(X, D, Z, LAM, chunk_size=7)
    R = X - Z @ D
    assert torch.allclose(sp.support_part + sp.on_span_deviation + sp.orthogonal_part, R, atol=1e-12)
    inner = (sp.orthogonal_part @ D.T) * (Z > 0)
    assert float(inner.abs().max()) < 1e-10
    # codes that violate T1 leave an on-span deviation D_S^T G^+ (D_S r - λ1)
    n = int(torch.nonzero(sp.support_size >= 2)[0])
    S = Z[n] > 0
    DS = D[S]
    dev = (DS.T @ torch.linalg.pinv(DS @ DS.T) @ (DS @ R[n] - LAM)).flatten()
    assert torch.allclose(sp.on_span_deviation[n], dev, atol=1e-10)


def test_chunking_does_not_change_the_answer():
    X, D, Z = orthonormal_case(n=33)
    a = split_residuals(X, D, Z, LAM, chunk_size=4)
    b = split_residuals(X, D, Z, LAM, chunk_size=1000)
    assert torch.allclose(a.support_part, b.support_part, atol=1e-14)
    assert torch.allclose(a.orthogonal_part, b.orthogonal_part, atol=1e-14)


def test_empty_support_leaves_everything_orthogonal():
    X = torch.tensor([[0.1, 0.2], [0.0, -1.0]], dtype=torch.float64)
    D = torch.eye(2, dtype=torch.float64)
    Z = torch.zeros(2, 2, dtype=torch.float64)
    sp = split_residuals(X, D, Z, LAM)
    assert float(sp.support_part.abs().max()) == 0.0
    assert torch.equal(sp.orthogonal_part, X)
    assert sp.support_share == 0.0 and sp.orthogonal_share == pytest.approx(1.0)


def test_duplicate_atoms_use_the_pseudo_inverse():
    # Two copies of e_0 sharing the code: the support part is the minimum-norm λ e_0.
    D = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    X = torch.tensor([[2.0, 0.1]], dtype=torch.float64)
    Z = torch.tensor([[0.85, 0.85, 0.0]], dtype=torch.float64)
    sp = split_residuals(X, D, Z, LAM)
    assert torch.allclose(sp.support_part, torch.tensor([[LAM, 0.0]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sp.orthogonal_part, torch.tensor([[0.0, 0.1]], dtype=torch.float64), atol=1e-12)
    assert float(sp.on_span_deviation.abs().max()) < 1e-12


def test_numpy_and_float32_answer_in_kind():
    X, D, Z = orthonormal_case()
    sp = split_residuals(X.numpy(), D.numpy(), Z.numpy(), LAM)
    assert isinstance(sp.support_part, np.ndarray) and isinstance(sp.support_size, np.ndarray)
    sp32 = split_residuals(X.float(), D.float(), Z.float(), LAM)
    assert sp32.support_part.dtype == torch.float32
    assert sp32.support_share == pytest.approx(sp.support_share, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lam": -1.0}, "lam"),
        ({"Z": -torch.ones(4, 2, dtype=torch.float64)}, "Z must be nonnegative"),
        ({"Z": torch.ones(4, 3, dtype=torch.float64)}, "Z must have shape"),
        ({"D": torch.ones(2, 5, dtype=torch.float64)}, "D has 5 columns"),
        ({"X": torch.ones(4, 3, dtype=torch.float32)}, "dtype"),
        ({"active_tol": -0.1}, "active_tol"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_split_errors_name_the_parameter(kwargs, match):
    args = {"X": torch.ones(4, 3, dtype=torch.float64), "D": torch.eye(3, dtype=torch.float64)[:2],
            "Z": torch.zeros(4, 2, dtype=torch.float64), "lam": LAM}
    args.update(kwargs)
    X, D, Z, lam = args.pop("X"), args.pop("D"), args.pop("Z"), args.pop("lam")
    with pytest.raises((ValueError, TypeError), match=match):
        split_residuals(X, D, Z, lam, **args)


def test_atom_mean_residual_is_lambda_d_in_the_wide_limit():
    # One atom per point, parallel to it: every residual is λ x/‖x‖ (T4), so m_k = λ d_k.
    g = torch.Generator().manual_seed(2)
    X = 2.0 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    D = torch.cat([X / X.norm(dim=1, keepdim=True), torch.eye(4, dtype=torch.float64)[:1]])
    Z = torch.zeros(6, 7, dtype=torch.float64)
    Z[torch.arange(6), torch.arange(6)] = X.norm(dim=1) - LAM
    m = atom_mean_residuals(X, D, Z, LAM)
    assert torch.equal(m.used, torch.tensor([True] * 6 + [False]))
    assert float(m.deviation.abs().max()) < 1e-12
    assert torch.allclose(m.parallel[:6], torch.ones(6, dtype=torch.float64), atol=1e-12)
    assert float(m.orthogonal.abs().max()) < 1e-12
    assert float(m.mass[6]) == 0.0 and float(m.mean_residual[6].abs().max()) == 0.0


def test_atom_mean_residual_detects_a_non_stationary_atom():
    # Atom e_0 coding the points (1, ±0.5) and (1, 0.5): the mean residual has an e_1 part.
    X = torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, -0.5]], dtype=torch.float64)
    D = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    Z = torch.full((3, 1), 1.0 - LAM, dtype=torch.float64)
    m = atom_mean_residuals(X, D, Z, LAM)
    assert float(m.parallel[0]) == pytest.approx(1.0)
    assert float(m.orthogonal[0]) == pytest.approx((0.5 / 3) / LAM)


def test_amortisation_split():
    X, D, Z = orthonormal_case()
    a = amortisation_split(X, D, Z, Z)
    assert float(a.amortisation_error.abs().max()) == 0.0 and a.amortisation_share == 0.0
    Zs = 0.5 * Z
    a = amortisation_split(X, D, Zs, Z)
    assert torch.allclose(a.sae_residual - a.projection_residual, a.amortisation_error)
    assert torch.allclose(a.amortisation_error, 0.5 * Z @ D)
    with pytest.raises(ValueError, match="Z_exact must have the shape"):
        amortisation_split(X, D, Z, Z[:, :2])
    with pytest.raises(ValueError, match="Z_exact must be nonnegative"):
        amortisation_split(X, D, Z, -Z - 1)


def test_linear_predictability_known_answers():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 5, generator=g, dtype=torch.float64)
    A = torch.randn(5, 3, generator=g, dtype=torch.float64)
    lp = linear_predictability(X, X @ A + 1.0)
    assert lp.vector_r2 == pytest.approx(1.0, abs=1e-6)
    assert lp.n_train == 200 and lp.n_test == 200
    noise = torch.randn(400, 3, generator=g, dtype=torch.float64)
    lp = linear_predictability(X, noise)
    assert lp.vector_r2 < 0.1 and lp.norm_r2 < 0.1
    # a residual of constant norm: the norm regression has nothing to explain
    U = X[:, :2] / X[:, :2].norm(dim=1, keepdim=True)
    assert np.isnan(linear_predictability(X, U).norm_r2)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"train_fraction": 1.5}, "train_fraction"), ({"train_fraction": "a"}, "train_fraction"),
     ({"ridge": -1.0}, "ridge")],
)
def test_linear_predictability_errors(kwargs, match):
    X = torch.randn(50, 2, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_predictability(X, X, **kwargs)


def test_linear_predictability_shape_errors():
    X = torch.randn(50, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="R must have as many rows"):
        linear_predictability(X, X[:10])
    with pytest.raises(ValueError, match="too few"):
        linear_predictability(X[:5], X[:5])
