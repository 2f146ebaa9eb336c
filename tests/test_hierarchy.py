"""Hierarchical data and the predictions of Chapter 3: the generators keep their ground truth,
the closed-form ansatz codes are the exact (T1-certified) codes, the partial-absorption
prediction is a stationary point of the expected cost, and the splitting prediction finds
the groups of a tree."""

import math

import numpy as np
import pytest
import torch

import companion
from companion import (ansatz_child_cost, ansatz_codes, concept_tree, group_atom, parent_child,
                       predict_partial_absorption, predict_splitting)
from companion.coding import encode
from companion.hierarchy import set_partitions


pytestmark = pytest.mark.usefixtures("one_thread")


def test_parent_child_ground_truth():
    data = parent_child(4000, 3, seed=0, n_features=6)
    dirs = data.directions
    assert dirs.shape == (4, 6)
    assert torch.allclose(dirs @ dirs.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    rebuilt = data.a[:, None] * data.parent
    has = data.has_child
    rebuilt[has] += data.b[has, None] * data.children[data.child[has]]
    assert torch.allclose(rebuilt, data.X, atol=1e-12)
    assert abs(float((~has).double().mean()) - 0.25) < 0.03
    assert bool((data.b[~has] == 0).all()) and float(data.a.min()) >= 0.5 and float(data.a.max()) <= 1.5
    counts = torch.bincount(data.child[has], minlength=3)
    assert int(counts.min()) > 900


def test_parent_child_fixed_magnitudes_device_dtype_and_seed():
    data = parent_child(50, 2, seed=1, parent_magnitude=(1, 1), child_magnitude=(0.7, 0.7),
                        dtype=torch.float32)
    assert data.X.dtype == torch.float32 and data.child.dtype == torch.int64
    assert bool((data.a == 1).all())
    assert bool(((data.b == 0) | ((data.b - 0.7).abs() < 1e-6)).all())
    again = parent_child(50, 2, seed=1, parent_magnitude=(1, 1), child_magnitude=(0.7, 0.7),
                         dtype=torch.float32)
    assert torch.equal(data.X, again.X)


def test_parent_child_errors():
    with pytest.raises(ValueError, match="n_features must be >= n_children \\+ 1 = 4"):
        parent_child(10, 3, seed=0, n_features=3)
    with pytest.raises(ValueError, match="parent_only must be < 1"):
        parent_child(10, 3, seed=0, parent_only=1.0)
    with pytest.raises(ValueError, match="child_magnitude must satisfy low <= high"):
        parent_child(10, 3, seed=0, child_magnitude=(2, 1))


def test_concept_tree_structure():
    tree = concept_tree(3000, (3, 2), seed=0, noise_std=0.0)
    assert tree.directions.shape == (10, 10)
    assert tree.parent.tolist() == [-1, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert tree.leaves == [4, 5, 6, 7, 8, 9] and tree.nodes_at(1) == [1, 2, 3]
    assert tree.leaves_under(2) == [6, 7] and tree.leaves_under(0) == tree.leaves
    assert torch.allclose(tree.coefficients @ tree.directions, tree.X, atol=1e-12)
    # each sample's path: the root, its leaf's group, its leaf
    support = (tree.coefficients != 0)
    assert bool((support.sum(1) == 3).all()) and bool(support[:, 0].all())
    assert bool(support[torch.arange(3000), tree.leaf].all())
    assert torch.equal(tree.members(2), torch.isin(tree.leaf, torch.tensor([6, 7])))
    unions = tree.sibling_unions()
    assert [4] in unions and [4, 5] in unions and [4, 5, 6, 7] in unions and tree.leaves in unions
    assert [5, 6] not in unions and [4, 5, 6] not in unions
    assert len(unions) == 6 + 3 + 4          # leaves, groups, unions of 2 or 3 groups
    means = tree.node_means()
    assert torch.allclose(means[0], tree.X.mean(0))
    with pytest.raises(ValueError, match="branching must hold at least one level"):
        concept_tree(10, (), seed=0)
    with pytest.raises(ValueError, match="n_features must be >= the number of nodes 10"):
        concept_tree(10, (3, 2), seed=0, n_features=5)


def test_ansatz_codes_are_the_exact_codes():
    # a grid that visits all four cases (nothing, only u, only p, both)
    lam, theta = 0.3, 0.9
    a, b = np.meshgrid(np.linspace(0.0, 2.0, 41), np.linspace(0.0, 2.0, 41))
    a, b = a.ravel(), b.ravel()
    X = np.stack([a, b, np.zeros_like(a)], 1)
    c, s = math.cos(theta), math.sin(theta)
    D = np.array([[1.0, 0, 0], [c, s, 0], [c, 0, s]])
    Z = encode(X, D, lam)
    zp, zu = ansatz_codes(a, b, theta, lam)
    assert np.abs(Z[:, 0] - zp).max() < 1e-9 and np.abs(Z[:, 1] - zu).max() < 1e-9
    assert np.abs(Z[:, 2]).max() == 0
    cases = {(bool(p > 0), bool(u > 0)) for p, u in zip(zp, zu)}
    assert cases == {(False, False), (False, True), (True, False), (True, True)}
    R = X - Z @ D
    f = 0.5 * (R * R).sum(1) + lam * Z.sum(1)
    assert np.abs(f - ansatz_child_cost(a, b, theta, lam)).max() < 1e-12


def test_ansatz_errors():
    with pytest.raises(ValueError, match="theta must lie in"):
        ansatz_codes(np.ones(2), np.ones(2), 2.0, 0.1)
    with pytest.raises(ValueError, match="a and b must have the same shape"):
        ansatz_codes(np.ones(2), np.ones(3), 0.5, 0.1)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        ansatz_codes(np.ones(2), np.ones(2), 0.5, 0.0)


def test_fixed_magnitudes_predict_exact_absorption():
    pred = predict_partial_absorption(0.3, parent_magnitude=(1, 1), child_magnitude=(0.7, 0.7))
    assert pred.theta == pytest.approx(math.atan2(0.7, 1.0), abs=1e-10)
    assert pred.absorption_rate == 1.0


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_prediction_is_stationary_and_consistent(lam):
    pred = predict_partial_absorption(lam)
    assert abs(pred.stationarity) < 1e-10
    # the expected cost (midpoint rule) is smallest at the predicted angle
    q = 600
    grid = 0.5 + (np.arange(q) + 0.5) / q
    A, B = np.meshgrid(grid, grid)

    def cost(th):
        return ansatz_child_cost(A.ravel(), B.ravel(), th, lam).mean()

    h = 1e-3
    slope = (cost(pred.theta + h) - cost(pred.theta - h)) / (2 * h)
    assert abs(slope) < 1e-4
    assert cost(pred.theta) < min(cost(pred.theta - 0.05), cost(pred.theta + 0.05))
    # the predicted rate is the fraction of grid points whose parent code is zero
    zp, _ = ansatz_codes(A.ravel(), B.ravel(), pred.theta, lam)
    assert abs(float((zp == 0).mean()) - pred.absorption_rate) < 5e-3


def test_absorption_grows_with_lam():
    rates = [predict_partial_absorption(lam).absorption_rate for lam in (0.1, 0.3, 0.5)]
    assert rates[0] < rates[1] < rates[2]


def test_group_atom_is_a_fixed_point():
    tree = concept_tree(600, (2, 2), seed=2)
    X = tree.X[tree.members(1)]
    d = group_atom(X, 0.2)
    w = (X @ d - 0.2).clamp(min=0)
    v = w @ X
    assert torch.allclose(v / v.norm(), d, atol=1e-10)
    assert float(d.norm()) == pytest.approx(1.0)
    # collinear group: the atom is the common direction
    line = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64) / 3 * torch.linspace(1, 2, 5, dtype=torch.float64)[:, None]
    assert torch.allclose(group_atom(line, 0.1), line[0] / line[0].norm(), atol=1e-12)
    with pytest.raises(ValueError, match="no sample of X projects beyond lam"):
        group_atom(line, 10.0)


def test_set_partitions_are_stirling_numbers():
    stirling = {1: 1, 2: 15, 3: 25, 4: 10, 5: 1}
    for k, n in stirling.items():
        parts = list(set_partitions([0, 1, 2, 3, 4], k))
        assert len(parts) == n
        assert all(sorted(sum(p, [])) == [0, 1, 2, 3, 4] for p in parts)


def test_predict_splitting_finds_the_tree():
    tree = concept_tree(800, (2, 2), seed=3, noise_std=0.0)
    groups = predict_splitting(tree, 0.2, 2)
    assert groups.blocks == [tree.leaves_under(1), tree.leaves_under(2)]
    assert groups.n_candidates == 7
    leaves = predict_splitting(tree, 0.2, 4)
    assert leaves.blocks == [[leaf] for leaf in tree.leaves]
    assert leaves.loss < groups.loss
    with pytest.raises(ValueError, match="n_atoms must be <= the 4 leaves"):
        predict_splitting(tree, 0.2, 5)


def test_empirical_ansatz_agrees_with_the_population_prediction():
    from companion.hierarchy import predict_partial_absorption_empirical

    g = torch.Generator().manual_seed(0)
    a = 0.5 + torch.rand(20000, generator=g, dtype=torch.float64)
    b = 0.5 + torch.rand(20000, generator=g, dtype=torch.float64)
    pop = companion.predict_partial_absorption(0.3)
    emp = predict_partial_absorption_empirical(a, b, 0.3)
    se = (pop.absorption_rate * (1 - pop.absorption_rate) / 20000) ** 0.5
    assert abs(emp.absorption_rate - pop.absorption_rate) < 4 * se
    assert abs(emp.cos_theta - pop.cos_theta) < 5e-3
    assert abs(emp.stationarity) < 1e-10
    # fixed magnitudes: the root is the direction of the sample itself, tan θ = b / a
    fixed = predict_partial_absorption_empirical(np.full(5, 1.0), np.full(5, 0.8), 0.3)
    assert fixed.theta == pytest.approx(math.atan2(0.8, 1.0), abs=1e-8)
    with pytest.raises(ValueError, match="same shape"):
        predict_partial_absorption_empirical(a, b[:3], 0.3)
