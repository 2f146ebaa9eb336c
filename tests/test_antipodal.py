"""Tests of companion.antipodal and companion.dense: constructed pairs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from companion.antipodal import (
    antipodality,
    dense_direction_costs,
    find_dense_pairs,
    firing_rates,
    pair_centroid_prediction,
)
from companion.dense import dense_direction_data

LAM = 0.3


def pair_sae(seed=0):
    """Latents 0, 1 an exact antipodal pair along e_0; latents 2, 3 generic."""
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(4, 5, generator=g, dtype=torch.float64)
    W_dec[0] = torch.tensor([2.0, 0, 0, 0, 0])
    W_dec[1] = torch.tensor([-0.5, 0, 0, 0, 0])
    W_dec[2:, 0] = 0.0
    W_enc = W_dec.T.clone()
    return W_dec, W_enc


def test_antipodality_of_an_exact_pair():
    W_dec, W_enc = pair_sae()
    a = antipodality(W_dec, W_enc)
    assert a.partner[0] == 1 and a.partner[1] == 0
    assert float(a.score[0]) == pytest.approx(1.0) and float(a.decoder_cosine[0]) == pytest.approx(-1.0)
    assert float(a.encoder_cosine[1]) == pytest.approx(-1.0)
    assert float(a.score[2]) < 1.0


def test_antipodality_without_encoder_is_squared_decoder_cosine():
    W_dec, _ = pair_sae()
    a = antipodality(W_dec)
    U = W_dec / W_dec.norm(dim=1, keepdim=True)
    C = U @ U.T
    C.fill_diagonal_(0)
    assert torch.allclose(a.score, (C ** 2).max(1).values)


def test_antipodality_numpy_in_numpy_out():
    W_dec, W_enc = pair_sae()
    a = antipodality(W_dec.numpy(), W_enc.numpy())
    assert isinstance(a.score, np.ndarray) and a.partner.tolist()[:2] == [1, 0]


@pytest.mark.parametrize(
    "W_dec, W_enc, match",
    [
        (torch.ones(1, 3, dtype=torch.float64), None, "at least two latents"),
        (torch.ones(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64), "W_enc must have shape"),
        (torch.zeros(3, 2, dtype=torch.float64), None, "W_dec has zero latents"),
        (torch.ones(3, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), "W_enc has zero latents"),
    ],
)
def test_antipodality_errors(W_dec, W_enc, match):
    with pytest.raises(ValueError, match=match):
        antipodality(W_dec, W_enc)


def test_firing_rates_and_errors():
    Z = torch.tensor([[0.0, 1.0], [0.5, 0.0], [0.2, 0.3], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(firing_rates(Z), torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(firing_rates(Z, threshold=0.25), torch.tensor([0.25, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="threshold"):
        firing_rates(Z, threshold=-1)
    with pytest.raises(ValueError, match="Z must be 2-dimensional"):
        firing_rates(Z[0])


def test_find_dense_pairs_on_a_sign_splitting_pair():
    W_dec, W_enc = pair_sae()
    g = torch.Generator().manual_seed(1)
    s = 2 * torch.rand(1000, generator=g, dtype=torch.float64) - 1
    Z = torch.zeros(1000, 4, dtype=torch.float64)
    Z[:, 0] = torch.clamp(s - LAM, min=0)
    Z[:, 1] = torch.clamp(-s - LAM, min=0)
    Z[:5, 2] = 1.0
    rep = find_dense_pairs(Z, W_dec, W_enc)
    assert len(rep.pairs) == 1
    p = rep.pairs[0]
    assert (p.first, p.second) == (0, 1)
    assert p.rate_first == pytest.approx(float((s > LAM).double().mean()))
    assert p.rate_second == pytest.approx(float((s < -LAM).double().mean()))
    assert p.co_firing == 0.0 and p.score == pytest.approx(1.0)
    # the same pair is not dense once the threshold for density is above both rates
    assert find_dense_pairs(Z, W_dec, W_enc, min_rate=0.5).pairs == []
    rep_np = find_dense_pairs(Z.numpy(), W_dec.numpy())
    assert isinstance(rep_np.firing_rate, np.ndarray) and len(rep_np.pairs) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [({"min_rate": 2.0}, "min_rate"), ({"max_cosine": 0.5}, "max_cosine"),
     ({"max_cosine": "x"}, "max_cosine"), ({"threshold": -1.0}, "threshold")],
)
def test_find_dense_pairs_errors(kwargs, match):
    W_dec, W_enc = pair_sae()
    Z = torch.zeros(10, 4, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        find_dense_pairs(Z, W_dec, W_enc, **kwargs)
    with pytest.raises(ValueError, match="Z has 3 latents"):
        find_dense_pairs(Z[:, :3], W_dec)


def test_dense_costs_two_point_distribution():
    # s = ±a: the pair costs h(a); the best shifted atom ties with it (c = λ - a).
    a = 0.8
    s = torch.tensor([a, -a] * 50, dtype=torch.float64)
    c = dense_direction_costs(s, LAM)
    assert c.ignore == pytest.approx(0.5 * a * a)
    assert c.pair == pytest.approx(LAM * a - 0.5 * LAM ** 2)
    assert c.shifted == pytest.approx(LAM * a - 0.5 * LAM ** 2, abs=1e-9)
    assert c.shift == pytest.approx(LAM - a, abs=1e-9)


def test_dense_costs_uniform_matches_closed_form():
    # s ~ U[-1, 1] on a fine grid; closed forms from Chapter 5's SymPy derivation.
    s = torch.linspace(-1, 1, 200001, dtype=torch.float64)
    c = dense_direction_costs(s, LAM)
    lam = LAM
    assert c.ignore == pytest.approx(1 / 6, abs=1e-5)
    assert c.pair == pytest.approx(lam / 2 - lam ** 2 / 2 + lam ** 3 / 6, abs=1e-5)
    assert c.pair < c.shifted < c.ignore
    with pytest.raises(ValueError, match="lam"):
        dense_direction_costs(s, 0.0)
    with pytest.raises(ValueError, match="at least one sample"):
        dense_direction_costs(s[:0], LAM)


def test_pair_prediction_without_other_residual_is_exactly_antipodal():
    g = torch.Generator().manual_seed(4)
    s = 2 * torch.rand(500, generator=g, dtype=torch.float64) - 1
    v = torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)
    p = pair_centroid_prediction(s, v, torch.zeros(500, 3, dtype=torch.float64), LAM)
    assert p.cosine == pytest.approx(-1.0)
    assert torch.allclose(p.d_plus, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    assert p.rate_plus == p.rate_plus_zeroth == pytest.approx(float((s > LAM).double().mean()))
    assert p.bend_plus == pytest.approx(0.0, abs=1e-6)


def test_pair_prediction_tilt_towards_a_constant_residual():
    # r_perp = m e_1 for every sample: tan(bend_+) = m E(s-λ)_+ / E[(s-λ)_+ s].
    g = torch.Generator().manual_seed(5)
    s = 2 * torch.rand(2000, generator=g, dtype=torch.float64) - 1
    m = 0.1
    R = torch.zeros(2000, 2, dtype=torch.float64)
    R[:, 1] = m
    p = pair_centroid_prediction(s, torch.tensor([1.0, 0.0], dtype=torch.float64), R, LAM)
    w = torch.clamp(s - LAM, min=0)
    expected = math.degrees(math.atan(m * float(w.sum()) / float((w * s).sum())))
    assert p.bend_plus == pytest.approx(expected)
    assert float(p.d_plus[1]) > 0 and float(p.d_minus[1]) > 0
    with pytest.raises(ValueError, match="other_residual must have shape"):
        pair_centroid_prediction(s, torch.tensor([1.0, 0.0], dtype=torch.float64), R[:, :1], LAM)
    with pytest.raises(ValueError, match="the pair member would be dead"):
        pair_centroid_prediction(s.abs(), torch.tensor([1.0, 0.0], dtype=torch.float64), R, LAM)


def test_dense_direction_data():
    data = dense_direction_data(300, 4, seed=0, coupling=0.5, n_features=7)
    assert data.X.shape == (300, 7)
    recon = data.dense_value[:, None] * data.dense_direction + data.sparse_codes @ data.sparse_features
    assert torch.allclose(data.X, recon)
    assert float((data.sparse_features @ data.dense_direction).abs().max()) == 0.0
    again = dense_direction_data(300, 4, seed=0, coupling=0.5, n_features=7)
    assert torch.equal(data.X, again.X)
    assert dense_direction_data(10, 2, seed=1, dtype=torch.float32).X.dtype == torch.float32
    with pytest.raises(ValueError, match="n_features"):
        dense_direction_data(10, 4, seed=0, n_features=3)
    with pytest.raises(ValueError, match="dense_range"):
        dense_direction_data(10, 4, seed=0, dense_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="p_active"):
        dense_direction_data(10, 4, seed=0, p_active=1.5)
    with pytest.raises(TypeError, match="coupling"):
        dense_direction_data(10, 4, seed=0, coupling="strong")


def test_centroid_step_is_the_identity_at_a_stationary_dictionary():
    # Orthonormal atoms coding points on the atoms themselves: already weighted centroids.
    from companion.antipodal import centroid_step
    X = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.5]], dtype=torch.float64)
    D = torch.eye(2, dtype=torch.float64)
    assert torch.allclose(centroid_step(X, D, LAM), D)
    # one atom coding (1, ±0.5) and (1, 0.5): the step tilts it towards e_1
    X = torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, -0.5]], dtype=torch.float64)
    Dn = centroid_step(X, torch.tensor([[1.0, 0.0]], dtype=torch.float64), LAM)
    assert float(Dn[0, 1]) > 0 and float(Dn.norm()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unit-norm"):
        centroid_step(X, torch.tensor([[2.0, 0.0]], dtype=torch.float64), LAM)
