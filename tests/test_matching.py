"""Matching atoms by cosine (Chapter 3): the Hungarian assignment recovers known permutations,
handles dictionaries of different sizes, answers numpy and torch alike, and names bad inputs."""

import numpy as np
import pytest
import torch

from companion import cosine_matrix, match_atoms


def random_dictionary(k, d, seed):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((k, d))
    return D / np.linalg.norm(D, axis=1, keepdims=True)


def test_recovers_a_permutation_with_noise():
    D = random_dictionary(8, 20, 0)
    perm = np.random.default_rng(1).permutation(8)
    noisy = D[perm] + 0.01 * np.random.default_rng(2).standard_normal((8, 20))
    m = match_atoms(D, noisy)
    # atom i of D sits at position argsort(perm)[i] of the permuted dictionary
    assert m.rows_a.tolist() == list(range(8))
    assert m.rows_b.tolist() == np.argsort(perm).tolist()
    assert m.min_cosine > 0.99
    assert m.unmatched_a.size == 0 and m.unmatched_b.size == 0


def test_assignment_beats_greedy():
    # a_i = e_i and b_j = (C[0, j], C[1, j], rest) give cos(a_i, b_j) = C[i, j]; greedy pairing
    # takes the largest cosine first (a0-b0, total 0.65), the assignment pairs crosswise (1.0)
    C = np.array([[0.6, 0.5], [0.5, 0.05]])
    a = np.eye(3)[:2]
    b = np.stack([C[:, 0], C[:, 1]], 0)
    b = np.concatenate([b, np.sqrt(1 - (b ** 2).sum(1, keepdims=True))], 1)
    m = match_atoms(a, b)
    assert np.allclose(m.cosine_matrix, C)
    assert m.rows_b.tolist() == [1, 0]
    assert m.cosines.sum() == pytest.approx(1.0)


def test_different_sizes_and_nearest():
    coarse = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    fine = np.array([[0.9, 0.1, 0.0], [0.8, 0.0, 0.6], [0.0, 1.0, 0.0], [0.1, 0.7, 0.7]])
    m = match_atoms(coarse, fine)
    assert len(m.rows_a) == 2 and m.unmatched_b.size == 2 and m.unmatched_a.size == 0
    assert m.partner_of_a() == {0: 0, 1: 2}
    assert m.nearest_b.tolist() == [0, 0, 1, 1]
    back = match_atoms(fine, coarse)
    assert back.partner_of_b() == {0: 0, 1: 2}


def test_signed_versus_unsigned():
    # b0 = -a0: signed matching avoids it (a0-b1, a1-b0: 0.6 + 0), unsigned takes it (1 + 0.8)
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[-1.0, 0.0], [0.6, 0.8]])
    assert match_atoms(a, b).rows_b.tolist() == [1, 0]
    unsigned = match_atoms(a, b, signed=False)
    assert unsigned.rows_b.tolist() == [0, 1]
    assert np.allclose(unsigned.cosines, [1.0, 0.8])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_inputs_and_cosine_matrix(dtype):
    D = torch.tensor(random_dictionary(5, 7, 3), dtype=dtype)
    C = cosine_matrix(D, 2 * D)
    assert isinstance(C, torch.Tensor) and C.dtype == dtype
    assert torch.allclose(torch.diagonal(C), torch.ones(5, dtype=dtype), atol=1e-6)
    m = match_atoms(D, D.flip(0))
    assert m.rows_b.tolist() == [4, 3, 2, 1, 0]
    assert isinstance(cosine_matrix(D.numpy(), D.numpy()), np.ndarray)


def test_errors_name_the_parameter():
    D = random_dictionary(3, 4, 0)
    with pytest.raises(ValueError, match="D_b has 5 columns"):
        match_atoms(D, np.ones((2, 5)))
    with pytest.raises(ValueError, match="D_a has zero-norm atoms"):
        match_atoms(np.zeros((2, 4)), D)
    with pytest.raises(ValueError, match="D_a must be 2-dimensional"):
        match_atoms(np.ones(4), D)
    with pytest.raises(ValueError, match="at least one atom"):
        match_atoms(np.ones((0, 4)), D)
