"""The absorption metric (Chapter 3) on constructed cases whose answer is known by hand."""

import math

import numpy as np
import pytest
import torch

from companion import absorption

P = np.array([1.0, 0.0, 0.0])            # the concept (parent) direction
C1 = np.array([0.0, 1.0, 0.0])


def unit(v):
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def test_fully_absorbed_sample():
    # dictionary: main latent p, absorbing latent u ∝ p + c1; sample x = p + c1 coded by u alone
    u = unit(P + C1)
    D = np.stack([P, u])
    X = np.array([P + C1])
    Z = np.array([[0.0, math.sqrt(2) - 0.1]])
    r = absorption(X, D, Z, P, np.array([True]), main=0)
    assert r.full.tolist() == [True] and r.full_absorption_rate == 1.0
    assert r.main_silent_rate == 1.0
    assert r.fraction.tolist() == [1.0]          # main projection 0, absorber carries ≥ 40%
    assert r.absorber.tolist() == [1]
    assert np.allclose(r.cosines, [1.0, 1 / math.sqrt(2)])


def test_not_absorbed_when_main_fires():
    D = np.stack([P, C1])
    X = np.array([P + C1])
    Z = np.array([[0.9, 0.9]])
    r = absorption(X, D, Z, P, np.array([True]), main=0)
    assert not r.full[0] and r.fraction[0] == 0.0 and r.main_silent_rate == 0.0


def test_partial_absorption_fraction_by_hand():
    # main carries 0.5 of P = 1; the absorber (cos 1/√2) carries z·cos = 0.4 (≥ 0.4·P):
    # fraction = min(0.4, 1 - 0.5) / (0.4 + 0.5) = 4/9
    u = unit(P + C1)
    D = np.stack([P, u])
    X = np.array([P + C1])
    Z = np.array([[0.5, 0.4 * math.sqrt(2)]])
    r = absorption(X, D, Z, P, np.array([True]), main=0)
    assert not r.full[0]
    assert r.fraction[0] == pytest.approx(4 / 9)


def test_thresholds_are_parameters():
    # absorber cosine 0.05: full absorption at the SAEBench threshold 0.025, not at 0.1
    u = unit([0.05, math.sqrt(1 - 0.05 ** 2), 0.0])
    D = np.stack([P, u])
    X = np.array([0.05 * P])
    Z = np.array([[0.0, 1.0]])            # projects 0.05 = 100% of P
    present = np.array([True])
    assert absorption(X, D, Z, P, present, 0).full[0]
    assert not absorption(X, D, Z, P, present, 0, full_cos_threshold=0.1).full[0]
    # too small a share of the probe projection: 0.05 of P = 1 is below ρ = 0.4
    X2 = np.array([P])
    r = absorption(X2, D, Z, P, present, 0)
    assert not r.full[0] and r.fraction[0] == 0.0
    assert absorption(X2, D, Z, P, present, 0, projection_threshold=0.01).full[0]


def test_absent_samples_do_not_count_and_rates_average_over_present():
    u = unit(P + C1)
    D = np.stack([P, u])
    X = np.array([P + C1, P + C1, C1])
    Z = np.array([[0.0, 1.3], [0.9, 0.3], [0.0, 0.0]])
    present = np.array([True, True, False])
    r = absorption(X, D, Z, P, present, 0)
    assert r.n_present == 2
    assert r.full.tolist() == [True, False, False]
    assert r.full_absorption_rate == 0.5 and r.main_silent_rate == 0.5
    assert r.main_silent.tolist() == [True, False, True]


def test_several_main_latents_and_absorber_cap():
    # two main latents, both silent; three absorbers each carrying 0.2 of P = 1
    D = np.array([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0],
                  unit([0.5, 1, 0, 0, 0]), unit([0.5, 0, 1, 0, 0]), unit([0.5, 0, 0, 1, 0])])
    cos = 0.5 / math.sqrt(1.25)
    X = np.array([[1.0, 0.2, 0.2, 0.2, 0.0]])
    Z = np.array([[0.0, 0.0, 0.2 / cos, 0.2 / cos, 0.2 / cos]])
    v = np.array([1.0, 0, 0, 0, 0])
    r = absorption(X, D, Z, v, np.array([True]), main=[0, 1])
    assert r.fraction[0] == 1.0                       # 0.6 ≥ 0.4 and the mains carry nothing
    assert not r.full[0]                              # no single latent carries 40%
    r2 = absorption(X, D, Z, v, np.array([True]), main=[0, 1], max_absorbers=1)
    assert r2.fraction[0] == 0.0                      # one absorber (0.2) is below 40%


def test_torch_answers_in_kind():
    u = torch.tensor(unit(P + C1))
    D = torch.stack([torch.tensor(P), u])
    X = torch.tensor(np.array([P + C1]))
    Z = torch.tensor([[0.0, 1.3]], dtype=torch.float64)
    r = absorption(X, D, Z, torch.tensor(P), torch.tensor([True]), 0)
    assert isinstance(r.full, torch.Tensor) and bool(r.full[0])


def test_errors_name_the_parameter():
    D = np.stack([P, C1])
    X = np.array([P])
    with pytest.raises(ValueError, match="Z must have shape"):
        absorption(X, D, np.zeros((1, 3)), P, np.array([True]), 0)
    with pytest.raises(ValueError, match="Z must be nonnegative"):
        absorption(X, D, -np.ones((1, 2)), P, np.array([True]), 0)
    with pytest.raises(ValueError, match="main latent index 5"):
        absorption(X, D, np.zeros((1, 2)), P, np.array([True]), 5)
    with pytest.raises(ValueError, match="concept must have 3 entries"):
        absorption(X, D, np.zeros((1, 2)), np.ones(2), np.array([True]), 0)
    with pytest.raises(ValueError, match="present must have shape"):
        absorption(X, D, np.zeros((1, 2)), P, np.array([True, False]), 0)
    with pytest.raises(TypeError, match="present must be a torch.Tensor"):
        absorption(X, D, np.zeros((1, 2)), P, [True], 0)
