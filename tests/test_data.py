"""Synthetic data generators: shapes, ground truth, determinism and input checks."""

import pytest
import torch

from companion import sparse_superposition


def test_sparse_superposition_keeps_its_ground_truth():
    data = sparse_superposition(300, 5, 9, 3, seed=4, magnitude=(0.5, 1.5), noise_std=0.01)
    assert data.X.shape == (300, 5) and data.features.shape == (9, 5) and data.codes.shape == (300, 9)
    assert data.X.dtype == torch.float64
    assert torch.allclose(data.features.norm(dim=1), torch.ones(9, dtype=torch.float64))
    assert bool(((data.codes > 0).sum(1) == 3).all())
    active = data.codes[data.codes > 0]
    assert float(active.min()) >= 0.5 and float(active.max()) <= 1.5
    assert torch.allclose(data.X, data.codes @ data.features + data.noise)


def test_sparse_superposition_is_seeded():
    a = sparse_superposition(50, 4, 6, 2, seed=7)
    b = sparse_superposition(50, 4, 6, 2, seed=7, dtype=torch.float32)
    assert torch.equal(a.X.float(), b.X)
    assert not torch.equal(a.X, sparse_superposition(50, 4, 6, 2, seed=8).X)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"k_active": 7}, ValueError, "k_active"),
        ({"n_samples": 0}, ValueError, "n_samples"),
        ({"magnitude": (2.0, 1.0)}, ValueError, "magnitude"),
        ({"magnitude": 1.0}, TypeError, "magnitude"),
        ({"noise_std": -0.1}, ValueError, "noise_std"),
        ({"dtype": torch.int32}, TypeError, "dtype"),
    ],
)
def test_sparse_superposition_rejects_bad_inputs(kwargs, exc, match):
    args = {"n_samples": 10, "n_features": 4, "n_sources": 6, "k_active": 2, "seed": 0}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sparse_superposition(**args)
