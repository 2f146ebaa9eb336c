"""The statistical verdict of certify_sae (companion.verdict, issue 23.2-3)."""

import json
import math

import numpy as np
import pytest
import torch

from companion import fit_dictionary
from companion.interop import certify_sae
from companion.sae import VanillaSAE
from companion.verdict import split_signs

pytestmark = pytest.mark.usefixtures("one_thread")


def sae_from(D, b_dec, W_enc=None, b_enc=None):
    """A VanillaSAE with decoder D (rows), bias b_dec, and a tied encoder unless given."""
    K, d = D.shape
    sae = VanillaSAE(d, K, dtype=torch.float64)
    with torch.no_grad():
        sae.W_dec.copy_(D)
        sae.b_dec.copy_(b_dec)
        sae.W_enc.copy_(D.T if W_enc is None else W_enc)
        sae.b_enc.copy_(torch.zeros(K, dtype=torch.float64) if b_enc is None else b_enc)
    return sae


def sparse_data(n, seed, d=6, k=4, noise=0.05):
    """Rows of k fixed unit features with sparse nonnegative weights, plus noise."""
    g = torch.Generator().manual_seed(100)
    F = torch.randn(k, d, generator=g, dtype=torch.float64)
    F = F / F.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    C = torch.rand(n, k, generator=g, dtype=torch.float64) * 2 * (torch.rand(n, k, generator=g) < 0.4)
    return C @ F + noise * torch.randn(n, d, generator=g, dtype=torch.float64), F


def test_split_signs_are_a_fixed_balanced_function_of_the_row_index():
    a = split_signs(np.arange(100000))
    assert set(np.unique(a)) == {-1.0, 1.0}
    # a fair split: |mean| within 4 standard errors (1/sqrt(n) = 0.0032) of 0
    assert abs(a.mean()) < 4 / math.sqrt(a.size)
    assert np.array_equal(split_signs(np.arange(50000, 50100)), a[50000:50100])
    assert np.array_equal(split_signs([7, 3]), a[[7, 3]])


def test_standard_error_and_split_difference_match_their_formulas():
    """se_k and the split-half difference computed by hand from the joint view and exact codes."""
    X, F = sparse_data(400, seed=1)
    g = torch.Generator().manual_seed(3)
    D = F + 0.2 * torch.randn(F.shape, generator=g, dtype=torch.float64)
    D = D / D.norm(dim=1, keepdim=True)
    sae = sae_from(D, torch.zeros(6, dtype=torch.float64))
    lam = 0.1
    cert = certify_sae(sae, X, lam, chunk_size=37)
    st = cert.statistics
    from companion import encode
    Z = encode(X, D, lam)
    Z = torch.as_tensor(getattr(Z, "codes", Z))
    R = X - Z @ D
    eps = torch.from_numpy(split_signs(np.arange(400)))
    for k in range(D.shape[0]):
        P = torch.eye(6, dtype=torch.float64) - torch.outer(D[k], D[k])
        W = Z[:, k:k + 1] * (R @ P)
        s = float((Z[:, k] ** 2).sum() + lam * Z[:, k].sum())
        assert st.atom_t2[k] == pytest.approx(float(W.sum(0).norm()) / s, rel=1e-6)
        assert st.atom_t2_se[k] == pytest.approx(math.sqrt(float((W * W).sum())) / s, rel=1e-6)
        assert st.atom_t2_split[k] == pytest.approx(float((eps[:, None] * W).sum(0).norm()) / s, rel=1e-6)
        assert st.atom_rows[k] == int((Z[:, k] > 0).sum())
    # the split does not depend on the chunking
    again = certify_sae(sae, X, lam, chunk_size=400).statistics
    np.testing.assert_allclose(again.atom_t2_split, st.atom_t2_split, rtol=1e-9)


def test_an_atom_firing_on_one_row_is_exactly_one_standard_error():
    X, F = sparse_data(200, seed=2, noise=0.01)
    Q, _ = torch.linalg.qr(torch.cat([F, torch.eye(6, dtype=torch.float64)]).T)
    e = Q[:, 4]                                             # orthogonal to the four features
    D = torch.cat([F, e[None]])
    X[17] += 3 * e + 0.5 * Q[:, 5]                          # the only row far along e
    sae = sae_from(D, torch.zeros(6, dtype=torch.float64))
    st = certify_sae(sae, X, 1.0).statistics
    assert st.atom_rows[-1] == 1
    assert st.atom_t2_z[-1] == pytest.approx(1.0, rel=1e-9)


def test_a_fitted_stationary_point_is_stationary_within_noise_on_fresh_rows_and_a_moved_one_is_not():
    """Fit to a certified stationary point on 20000 rows; certify on 3000 fresh rows of the same law."""
    Xfit, _ = sparse_data(20000, seed=5)
    lam = 0.1
    fit = fit_dictionary(Xfit, 4, lam, n_restarts=1, progress=False, fit_bias=True, seed=0)
    D, b = torch.as_tensor(fit.D), torch.as_tensor(fit.bias)
    Xnew, _ = sparse_data(3000, seed=6)
    st = certify_sae(sae_from(D, b), Xnew, lam).statistics
    # the population gradient at D is of order 1/sqrt(20000): within noise on 3000 rows
    assert st.stationary_within_noise, st.verdict
    assert st.verdict.startswith("stationary within sampling noise at 3000 rows")
    # weighted T2 against the floor: about 1 for a stationary dictionary (chi-like, spread < 1)
    assert 0.3 < st.t2_weighted / st.noise_floor < 2.0
    # move every atom by 0.1 rad: the gradient is then far beyond noise on 3000 rows
    g = torch.Generator().manual_seed(9)
    Dm = D + 0.1 * torch.randn(D.shape, generator=g, dtype=torch.float64)
    Dm = Dm / Dm.norm(dim=1, keepdim=True)
    moved = certify_sae(sae_from(Dm, b), Xnew, lam)
    st = moved.statistics
    assert not st.stationary_within_noise and st.n_beyond >= 1
    assert st.verdict.startswith("not stationary: ") and f"atom {st.worst_atom}" in st.verdict
    assert st.worst_atom == st.beyond[0]
    step = {s["topic"]: s for s in moved.next_steps}["dictionary"]
    assert step["act"] and "fit_dictionary" in step["action"]
    assert "not stationary" in moved.summary() and "what to do next" in moved.summary()


def test_the_new_atom_gain_is_judged_on_held_out_rows():
    """Rows on one of four features: three atoms leave one out, and a new atom helps on held-out
    rows; with the four, what a new atom gains is below 0.1% of the loss."""
    g = torch.Generator().manual_seed(7)
    F = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0][:4]
    n = 4000
    which = torch.randint(0, 4, (n,), generator=g)
    X = (1 + torch.rand(n, 1, generator=g, dtype=torch.float64)) * F[which]
    X = X + 0.01 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    lam = 0.1
    three = certify_sae(sae_from(F[:3], torch.zeros(6, dtype=torch.float64)), X, lam)
    st = three.statistics
    assert st.heldout_gain_pct > 3 * st.heldout_gain_se_pct > 0
    assert {s["topic"]: s for s in three.next_steps}["width"]["act"]
    four = certify_sae(sae_from(F, torch.zeros(6, dtype=torch.float64)), X, lam).statistics
    assert not {s["topic"]: s for s in four.next_steps}["width"]["act"]
    assert four.heldout_gain_pct < 0.1 < st.heldout_gain_pct


def test_dead_atom_triage_and_the_random_atom_control():
    X, F = sparse_data(1000, seed=8, d=6, k=4)
    extra = torch.tensor([[0.0, 0, 0, 0, 0, 1]], dtype=torch.float64)
    extra = extra - (extra @ F.T) @ torch.linalg.pinv(F.T)   # roughly off the data's directions
    extra = extra / extra.norm()
    D = torch.cat([F, extra])
    b_enc = torch.zeros(5, dtype=torch.float64)
    b_enc[0] = -100.0                                        # the encoder never fires latent 0
    cert = certify_sae(sae_from(D, torch.zeros(6, dtype=torch.float64), b_enc=b_enc), X, 0.2)
    st = cert.statistics
    assert 0 in cert.sae_codes.dead_atoms and 0 in st.dead_encoder_only
    assert st.n_random == 256 and 0 <= st.n_random_used <= 256
    topics = {s["topic"]: s for s in cert.next_steps}
    assert topics["dead latents"]["act"] and "encoder" in topics["dead latents"]["action"]
    if st.dead_exact:
        assert all(c < 1.0 for c in st.dead_exact_max_corr)


def test_statistics_in_json_and_the_level_is_checked():
    X, F = sparse_data(300, seed=3)
    cert = certify_sae(sae_from(F, torch.zeros(6, dtype=torch.float64)), X, 0.1, alpha=0.01)
    d = json.loads(json.dumps(cert.to_dict(), allow_nan=False))
    assert d["statistics"]["alpha"] == 0.01 and d["world_size"] == 1
    assert d["verdict"] == cert.statistics.verdict and d["next_steps"] == cert.next_steps
    assert len(d["statistics"]["atom_t2_se"]) == 4
    with pytest.raises(ValueError, match="alpha must lie in"):
        certify_sae(sae_from(F, torch.zeros(6, dtype=torch.float64)), X, 0.1, alpha=1.5)
    no_exact = certify_sae(sae_from(F, torch.zeros(6, dtype=torch.float64)), X, 0.1, exact=False)
    assert no_exact.statistics is None and no_exact.next_steps[0]["topic"] == "encoder"
