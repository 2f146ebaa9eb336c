"""companion.beyond_l1 (Chapter 9): NNLS refit, local moves against brute force, plain-centroid
stationarity against finite differences, the matched-λ L1 view, and SAELens TopK / BatchTopK /
JumpReLU checkpoints trained, saved and loaded back."""

import json

import numpy as np
import pytest
import torch
from scipy import optimize

from helpers import quiet
from companion.beyond_l1 import (SparseSAE, best_support_codes, certify_sparse_sae, load_sparse_sae,
                                 local_moves, matched_lambda, nnls_refit, plain_centroid_stationarity,
                                 refit_gap)

pytestmark = pytest.mark.usefixtures("one_thread")


def instance(seed, n=30, d=5, K=7):
    rng = np.random.default_rng(seed)
    D = rng.normal(size=(K, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Z = rng.uniform(0.5, 1.5, size=(n, K)) * (rng.random((n, K)) < 0.3)
    X = Z @ D + 0.1 * rng.normal(size=(n, d))
    return X, D


def nnls_cost(x, D, B):
    if len(B) == 0:
        return 0.5 * x @ x, np.zeros(0)
    c, rn = optimize.nnls(D[list(B)].T, x)
    return 0.5 * rn ** 2, c


def brute_moves(x, D, z, k=None, eps=None):
    """Best single move by enumerating every move and solving scipy's NNLS on it."""
    A = tuple(np.flatnonzero(z > 0))
    err, _ = nnls_cost(x, D, A)
    pen = (lambda B: eps * len(B)) if eps is not None else (lambda B: 0.0)
    base = err + (eps * len(A) if eps is not None else 0.0)
    K = D.shape[0]
    best = 0.0
    out = [j for j in range(K) if j not in A]
    moves = []
    if eps is not None or len(A) < k:
        moves += [A + (j,) for j in out]
    if eps is not None:
        moves += [tuple(i for i in A if i != r) for r in A]
    moves += [tuple(i for i in A if i != r) + (j,) for r in A for j in out]
    for B in moves:
        e, c = nnls_cost(x, D, B)
        best = max(best, base - e - pen(B))
    return best


def test_nnls_refit_matches_scipy():
    X, D = instance(0)
    rng = np.random.default_rng(1)
    S = rng.random((X.shape[0], D.shape[0])) < 0.5
    Z = nnls_refit(X, D, S)
    for n in range(X.shape[0]):
        B = np.flatnonzero(S[n])
        _, c = nnls_cost(X[n], D, B)
        np.testing.assert_allclose(Z[n, B], c, atol=1e-9)
        assert np.all(Z[n, ~S[n]] == 0)
    # answers in kind
    Zt = nnls_refit(torch.from_numpy(X), torch.from_numpy(D), torch.from_numpy(S))
    assert isinstance(Zt, torch.Tensor)
    np.testing.assert_allclose(Zt.numpy(), Z, atol=1e-12)


def test_refit_gap_zero_at_refit_and_positive_for_shrunk_codes():
    X, D = instance(2)
    S = np.random.default_rng(3).random((X.shape[0], D.shape[0])) < 0.4
    Z = nnls_refit(X, D, S)
    g = refit_gap(X, D, Z)
    assert abs(g.gap) < 1e-10 and abs(g.shrinkage - 1) < 1e-9
    g2 = refit_gap(X, D, 0.7 * Z)
    assert g2.gap > 0 and abs(g2.shrinkage - 0.7) < 1e-9


@pytest.mark.parametrize("k,eps", [(2, None), (3, None), (None, 0.05), (None, 0.3)])
def test_local_moves_match_brute_force(k, eps):
    X, D = instance(4, n=25)
    rng = np.random.default_rng(5)
    K = D.shape[0]
    # random supports of size <= k (or up to 3)
    top = k if k is not None else 3
    S = np.zeros((X.shape[0], K), bool)
    for n in range(X.shape[0]):
        S[n, rng.choice(K, size=rng.integers(1, top + 1), replace=False)] = True
    Z = nnls_refit(X, D, S)
    lm = local_moves(X, D, Z, k=k, eps=eps)
    for n in range(X.shape[0]):
        want = brute_moves(X[n], D, Z[n], k=k, eps=eps)
        assert lm.decrease[n] == pytest.approx(want, abs=1e-8), n


@pytest.mark.parametrize("k,eps", [(2, None), (None, 0.1)])
def test_exact_codes_have_no_improving_move(k, eps):
    X, D = instance(6, n=20)
    Z = best_support_codes(X, D, k=k, eps=eps)
    assert local_moves(X, D, Z, k=k, eps=eps).certified


def test_jumprelu_orthonormal_codes_are_hard_thresholding():
    rng = np.random.default_rng(7)
    Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    D = Q.T[:4]
    X = rng.normal(size=(40, 5))
    eps = 0.2
    Z = best_support_codes(X, D, eps=eps)
    G = X @ D.T
    want = np.where(G > np.sqrt(2 * eps), G, 0.0)
    np.testing.assert_allclose(Z, want, atol=1e-9)


def test_plain_centroid_gradient_matches_finite_differences():
    X, D = instance(8, n=40)
    S = np.random.default_rng(9).random((X.shape[0], D.shape[0])) < 0.4
    Z = nnls_refit(X, D, S)

    def value(Dm):  # mean NNLS error on the fixed supports (unit atoms)
        Zm = nnls_refit(X, Dm, S)
        return 0.5 * np.mean(np.sum((X - Zm @ (Dm / np.linalg.norm(Dm, axis=1, keepdims=True))) ** 2, 1))

    R = X - Z @ D
    st = plain_centroid_stationarity(X, D, Z)
    assert np.nanmax(np.abs(st.radial)) < 1e-9   # NNLS codes: d_k^T r_n = 0 on active rows
    rng = np.random.default_rng(10)
    for k in range(D.shape[0]):
        if not (Z[:, k] > 0).any():
            continue
        u = rng.normal(size=D.shape[1])
        u -= (u @ D[k]) * D[k]
        u /= np.linalg.norm(u)
        h = 1e-6
        Dp, Dm = D.copy(), D.copy()
        Dp[k] = np.cos(h) * D[k] + np.sin(h) * u
        Dm[k] = np.cos(h) * D[k] - np.sin(h) * u
        fd = (value(Dp) - value(Dm)) / (2 * h)
        grad = -(Z[:, k] @ R) / X.shape[0]
        assert fd == pytest.approx(grad @ u, abs=1e-6)
        assert st.ratio[k] == pytest.approx(np.linalg.norm(Z[:, k] @ R) / (Z[:, k] @ Z[:, k]))


def test_plain_centroid_noise_ratio_near_one_for_pure_noise():
    rng = np.random.default_rng(11)
    N, d = 4000, 6
    D = np.eye(d)[:2]
    Z = np.zeros((N, 2))
    Z[:, 0] = rng.uniform(0.5, 1.5, N)
    X = Z @ D + np.concatenate([np.zeros((N, 1)), np.zeros((N, 1)), rng.normal(size=(N, d - 2))], 1)
    st = plain_centroid_stationarity(X, D, Z)
    assert st.noise_ratio[0] < 3      # the population gradient is zero here
    X2 = X + 0.5 * Z[:, [0]] * np.eye(d)[2]        # a real pull towards e_2: |g| = 0.5 E z^2 = 0.54, se = (4 E z^2 / N)^0.5 = 0.033
    assert plain_centroid_stationarity(X2, D, Z).noise_ratio[0] > 10


def test_matched_lambda_reaches_target():
    X, D = instance(12, n=60)
    m = matched_lambda(X, D, 1.5)
    assert abs(m.l0 - 1.5) < 0.1 and m.lam > 0
    assert abs(float((m.Z > 0).sum(1).mean()) - m.l0) < 1e-12


def test_sparse_sae_topk_and_jumprelu_encode():
    sae = SparseSAE(3, 4, architecture="topk", k=2, dtype=torch.float64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3, 4, dtype=torch.float64))
        sae.W_dec.copy_(2 * torch.cat([torch.eye(3), torch.ones(1, 3) / 3 ** 0.5]).double())
    x = np.array([[3.0, -1.0, 2.0]])
    np.testing.assert_allclose(sae.encode(x), [[3.0, 0, 2.0, 0]])
    Xc, D, Z = sae.joint_view(x)
    np.testing.assert_allclose(Z, [[6.0, 0, 4.0, 0]])      # codes on unit atoms: times ||W_dec||
    np.testing.assert_allclose(Z @ D, sae.decode(sae.encode(x)))
    j = SparseSAE(3, 4, architecture="jumprelu", dtype=torch.float64)
    with torch.no_grad():
        j.W_enc.copy_(torch.eye(3, 4, dtype=torch.float64))
        j.W_dec.copy_(torch.eye(4, 3, dtype=torch.float64))
        j.threshold.fill_(2.5)
    np.testing.assert_allclose(j.encode(x), [[3.0, 0, 0, 0]])


# ----------------------------------------------------------------------------------------
# SAELens round trips
# ----------------------------------------------------------------------------------------

sae_lens = pytest.importorskip("sae_lens")


def _data(n=512, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(10, d, generator=g, dtype=torch.float64)
    F = F / F.norm(dim=1, keepdim=True)
    c = torch.rand(n, 10, generator=g, dtype=torch.float64) * (torch.rand(n, 10, generator=g) < 0.2)
    return (2 * c @ F).float()


def _train(kind, path, X, apply_b_dec=True):
    from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUTrainingSAE,
                          JumpReLUTrainingSAEConfig, LoggingConfig, SAETrainer, TopKTrainingSAE,
                          TopKTrainingSAEConfig)
    from sae_lens.config import SAETrainerConfig

    d = X.shape[1]
    torch.manual_seed(0)
    if kind == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=12, k=2, apply_b_dec_to_input=apply_b_dec))
    elif kind == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=12, k=2))
    else:
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=12, l0_coefficient=0.2,
                                                            apply_b_dec_to_input=apply_b_dec))

    def batches():
        g = torch.Generator().manual_seed(1)
        while True:
            perm = torch.randperm(X.shape[0], generator=g)
            for s in range(0, X.shape[0] - 63, 64):
                yield X[perm[s:s + 64]]

    cfg = SAETrainerConfig(total_training_samples=64 * 40, train_batch_size_samples=64, lr=3e-3,
                           lr_end=3e-3, device="cpu", logger=LoggingConfig(log_to_wandb=False))
    with quiet():
        trained = SAETrainer(cfg, sae, data_provider=batches()).fit()
        trained.save_inference_model(str(path))
        from sae_lens import SAE
        back = SAE.load_from_disk(str(path))
    return back


@pytest.mark.parametrize("kind,apply_b_dec", [("topk", True), ("topk", False), ("batchtopk", True),
                                              ("jumprelu", True), ("jumprelu", False)])
def test_saelens_round_trip(tmp_path, kind, apply_b_dec):
    X = _data()
    ref = _train(kind, tmp_path / kind, X, apply_b_dec)
    ck = load_sparse_sae(tmp_path / kind)
    assert ck.architecture == kind
    with torch.no_grad():
        want_z = ref.encode(X).double().numpy()
        want_x = ref.decode(ref.encode(X)).double().numpy()
    got_z = ck.sae.encode(X.double().numpy())
    np.testing.assert_allclose(got_z, want_z, atol=1e-5)
    np.testing.assert_allclose(ck.sae(X.double().numpy()), want_x, atol=1e-5)
    Xc, D, Z = ck.sae.joint_view(X.double().numpy())
    np.testing.assert_allclose(Z @ D + ck.sae.b_dec.detach().numpy(), want_x, atol=1e-5)
    if kind == "jumprelu":
        assert ck.eps == pytest.approx(0.1)
    elif kind == "topk":
        assert ck.k == 2 and ck.eps is None
    else:
        assert ck.k == 2
        th = ck.sae.threshold.detach().numpy()
        assert np.all(th == th[0])                 # one global threshold
    cert = certify_sparse_sae(ck.sae, X, eps=ck.eps if kind == "jumprelu" else None, max_samples=200)
    assert cert.refit.gap >= -1e-12
    assert 0 <= cert.moves.fraction_improvable <= 1
    assert cert.matched is not None and cert.matched.lam > 0
    assert "local moves" in cert.summary()


def test_loader_refuses_other_architectures(tmp_path):
    from companion.interop import CheckpointError

    X = _data()
    _train("topk", tmp_path / "t", X)
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    for arch, words in (("gated", "gate"), ("matryoshka_batchtopk", "nested"), ("standard", "load_sae")):
        bad = dict(cfg, architecture=arch)
        bad["metadata"] = dict(cfg["metadata"], training_architecture=arch)
        (tmp_path / "t" / "cfg.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=words):
            load_sparse_sae(tmp_path / "t")
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(dict(cfg, normalize_activations="layer_norm")))
    with pytest.raises(CheckpointError, match="layer_norm"):
        load_sparse_sae(tmp_path / "t")
