"""The absorption metric (Chapter 3) on constructed cases whose answer is known by hand."""

import math
import warnings

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


# ---- SAEBench's pipeline: ground-truth probe, k-sparse probing, scores on probe true positives ----

from companion import concept_probe, k_sparse_probing, saebench_absorption  # noqa: E402
import companion  # noqa: E402

E = np.eye(4)
# latents: 0 the concept p = e0, 1 and 2 the absorbers unit(p ± e1), 3..6 the absent samples' ±e1, ±e2
D7 = np.stack([E[0], unit(E[0] + E[1]), unit(E[0] - E[1]), E[1], -E[1], E[2], -E[2]])


def _block(special_codes):
    """One block of 100 samples: 48 present x = p (coded by latent 0), 2 present x = p ± e1 coded by
    ``special_codes`` (a function of the sign), 50 absent x = ±e1, ±e2 (coded by their own latent).
    The block is invariant under e1 → −e1 and e2 → −e2, so the probe direction is exactly p."""
    X, Z, y = [], [], []
    for _ in range(48):
        X.append(E[0]); Z.append(np.eye(7)[0]); y.append(True)
    for sign in (1, -1):
        X.append(E[0] + sign * E[1]); Z.append(special_codes(sign)); y.append(True)
    for j, x in [(3, E[1]), (4, -E[1])] * 12 + [(5, E[2]), (6, -E[2])] * 13:
        X.append(x); Z.append(np.eye(7)[j]); y.append(False)
    return np.array(X), np.array(Z), np.array(y)


def _case(special_codes):
    """Train on one block, hold out an identical copy: every held-out number is known by hand."""
    X, Z, y = _block(special_codes)
    test = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    return np.r_[X, X], np.r_[Z, Z], np.r_[y, y], test


def _codes(z0, absorber):
    def codes(sign):
        z = np.zeros(7)
        z[0] = z0
        z[1 if sign > 0 else 2] = absorber
        return z
    return codes


def test_probe_is_the_concept_direction_and_passes_the_gate():
    X, _, y, test = _case(_codes(1.0, 0.0))
    probe = concept_probe(X, y, test=test)
    assert probe.f1 == 1.0 and probe.passed and probe.min_f1 == 0.6
    assert np.allclose(probe.direction, E[0], atol=1e-12)        # by the block's symmetry
    assert (probe.test == test).all()


def test_saebench_full_absorption():
    # the two x = p ± e1 are coded by their absorber alone, π = √2 · cos 45° = 1 = P: fully absorbed
    X, Z, y, test = _case(_codes(0.0, math.sqrt(2)))
    r = saebench_absorption(X, D7, Z, y, test=test)
    assert r.evaluated and r.reason == ""
    # k-sparse probing: latent 0 alone has F1 = 96/98 (2 of 50 missed); the next latent adds one
    # sample at most (F1 ≤ 98/99), a jump below 0.03, so latent 0 is the only main latent
    assert r.sparse.ranking[0] == 0 and r.sparse.f1[0] == pytest.approx(96 / 98, abs=1e-12)
    assert r.sparse.f1[1] - r.sparse.f1[0] < 0.03 and r.main == [0] and r.sparse.n_split == 0
    assert r.n_probe_true_positives == 50 and r.samples.tolist() == list(range(100, 150))
    assert r.n_full_absorption == 2 and r.full_absorption_rate == pytest.approx(2 / 50, abs=1e-12)
    assert r.full.tolist() == [False] * 48 + [True, True]
    assert r.top_latent[-2:].tolist() == [1, 2]
    assert r.fraction.tolist() == pytest.approx([0.0] * 48 + [1.0, 1.0], abs=1e-12)
    assert r.mean_absorption_fraction == pytest.approx(2 / 50, abs=1e-12)
    assert r.cosines == pytest.approx([1, 2 ** -0.5, 2 ** -0.5, 0, 0, 0, 0], abs=1e-12)


def test_saebench_on_exact_codes_with_the_same_probe():
    # exact codes on the same dictionary absorb too: for x = p + e1 one atom at 45° (cost ≈ √2 λ)
    # beats p and e1 together (cost ≈ 2λ); the absorber carries (√2 − λ)·cos 45° = 1 − λ/√2 of P = 1
    X, Z, y, test = _case(_codes(0.0, math.sqrt(2)))
    probe = concept_probe(X, y, test=test)
    lam = 0.1
    Zx = companion.encode(X, D7, lam)
    r = saebench_absorption(X, D7, Zx, y, probe=probe)
    assert r.probe is probe and r.main == [0]
    assert r.full.tolist() == [False] * 48 + [True, True]
    assert r.full_absorption_rate == pytest.approx(2 / 50, abs=1e-12)
    assert r.top_latent[-2:].tolist() == [1, 2]


def test_saebench_partial_absorption():
    # the two x = p ± e1 keep half their main latent (π = 0.5) and an absorber carries π = 0.4 ≥ 0.4·P:
    # not full (the main latent fires); fraction min(0.4, 1 − 0.5) / (0.4 + 0.5) = 4/9 each
    X, Z, y, test = _case(_codes(0.5, 0.4 * math.sqrt(2)))
    r = saebench_absorption(X, D7, Z, y, test=test)
    assert r.main == [0] and r.sparse.f1[0] == 1.0
    assert r.n_full_absorption == 0 and r.full_absorption_rate == 0.0
    assert r.fraction[-2:] == pytest.approx([4 / 9, 4 / 9], abs=1e-12)
    assert r.mean_absorption_fraction == pytest.approx(2 * (4 / 9) / 50, abs=1e-12)


def test_saebench_no_absorption():
    X, Z, y, test = _case(_codes(1.0, 0.0))
    r = saebench_absorption(X, D7, Z, y, test=test)
    assert r.evaluated and r.main == [0]
    assert r.full_absorption_rate == 0.0 and r.mean_absorption_fraction == 0.0
    assert (r.top_latent == 0).all()


def test_probe_failing_the_gate_is_refused():
    # labels independent of X: present and absent samples are the same mirrored points (1 : 4), so
    # the balanced probe is w = 0, b = 0; no sample is predicted present and F1 = 0 ≤ 0.6
    pts = [E[1], -E[1], E[2], -E[2]]
    X = np.array(pts * 2 + pts * 8)
    y = np.array([True] * 8 + [False] * 32)
    X, y = np.r_[X, X], np.r_[y, y]
    test = np.r_[np.zeros(40, bool), np.ones(40, bool)]
    Z = np.abs(X) @ np.eye(4)
    probe = concept_probe(X, y, test=test)
    assert probe.f1 == 0.0 and not probe.passed
    r = saebench_absorption(X, np.eye(4), Z, y, test=test)
    assert not r.evaluated and "not above the gate 0.6" in r.reason
    assert r.sparse is None and r.n_probe_true_positives == 0
    assert math.isnan(r.full_absorption_rate) and math.isnan(r.mean_absorption_fraction)


def test_k_sparse_probing_keeps_a_split_concept():
    # the concept is split: half the present samples fire latent 0, half latent 1. One latent gives
    # F1 = 2·25/(2·25 + 25) = 2/3, two give 1 (a jump above 0.03), three add nothing: main = {0, 1}
    X, Z, y = [], [], []
    for i in range(50):
        X.append(E[0]); Z.append(np.eye(4)[i % 2]); y.append(True)
    for i in range(50):
        X.append(E[1 + i % 2]); Z.append(np.eye(4)[2 + i % 2]); y.append(False)
    X, Z, y = np.array(X * 2), np.array(Z * 2), np.array(y * 2)
    test = np.r_[np.zeros(100, bool), np.ones(100, bool)]
    ks = k_sparse_probing(Z, y, test)
    assert sorted(ks.main) == [0, 1] and ks.n_split == 1
    assert ks.f1[:3] == pytest.approx([2 / 3, 1.0, 1.0], abs=1e-12)
    assert len(ks.f1) == 4                                        # max_k capped at the latents


def test_k_sparse_probing_converges_on_nearly_duplicate_latents():
    # a separable concept read by latent 0 and by latent 1 ≈ latent 0 (a split pair, as trained SAEs
    # have): liblinear's ranking probe at tol 1e-8 stalled at its 10000-iteration cap here and warned;
    # it must converge, and rank the two duplicates first (between them the ℓ1 probe may split
    # the weight either way)
    from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning

    rng = np.random.default_rng(5)
    Z = np.maximum(rng.normal(size=(400, 16)) * 3 - 1, 0)
    Z[:, 1] = Z[:, 0] * (1 + 1e-3 * rng.random(400))
    y = Z[:, 0] > 2
    test = np.r_[np.zeros(300, bool), np.ones(100, bool)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SklearnConvergenceWarning)
        ks = k_sparse_probing(Z, y, test)
    assert sorted(ks.ranking[:2].tolist()) == [0, 1]
    assert ks.main[0] in (0, 1)


def test_saebench_scores_agree_with_absorption_for_unit_atoms():
    X, Z, y, test = _case(_codes(0.5, 0.4 * math.sqrt(2)))
    r = saebench_absorption(X, D7, Z, y, test=test, main=[0])
    s = r.samples
    old = absorption(X[s], D7, Z[s], r.probe.direction, y[s], main=0)
    assert r.sparse is None
    assert old.fraction == pytest.approx(r.fraction, abs=1e-12) and (old.full == r.full).all()


def test_saebench_errors_name_the_parameter():
    X, Z, y, test = _case(_codes(1.0, 0.0))
    with pytest.raises(ValueError, match="Z must have shape"):
        saebench_absorption(X, D7, Z[:, :3], y, test=test)
    with pytest.raises(ValueError, match="Z must be nonnegative"):
        saebench_absorption(X, D7, -Z, y, test=test)
    with pytest.raises(ValueError, match="labels must have shape"):
        saebench_absorption(X, D7, Z, y[:5], test=test)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        saebench_absorption(X, D7, Z, list(y), test=test)
    with pytest.raises(ValueError, match="test must hold out some samples"):
        concept_probe(X, y, test=np.ones(len(y), bool))
    with pytest.raises(ValueError, match="labels must contain both classes"):
        concept_probe(X, np.ones(len(y), bool), test=test)
    with pytest.raises(ValueError, match="main latent index 9"):
        saebench_absorption(X, D7, Z, y, test=test, main=[9])
