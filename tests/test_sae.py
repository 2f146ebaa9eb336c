"""The vanilla SAE (Chapter 1): its loss is the package's SAE loss, it is invariant under
rescaling, it trains reproducibly, and its joint view is a point of the joint problem."""

import numpy as np
import pytest
import torch

import companion
from companion import VanillaSAE, joint_loss, sae_loss, sparse_superposition, train_sae

LAM = 0.1


@pytest.fixture(scope="module")
def data():
    return sparse_superposition(256, 6, 8, 2, seed=3, noise_std=0.02)


@pytest.fixture(scope="module")
def trained(data):
    return train_sae(data.X, 8, LAM, steps=150, batch_size=64, lr=3e-3, seed=0, progress=False)


def random_sae(d_in=5, d_sae=7, seed=0, dtype=torch.float64):
    sae = VanillaSAE(d_in, d_sae, dtype=dtype)
    g = companion.generator(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return sae


def params(sae):
    return [p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]


def test_shapes_follow_saelens_layout():
    sae = VanillaSAE(5, 7)
    assert sae.W_enc.shape == (5, 7) and sae.b_enc.shape == (7,)
    assert sae.W_dec.shape == (7, 5) and sae.b_dec.shape == (5,)
    X = torch.randn(11, 5)
    out = sae(X)
    assert out.reconstruction.shape == (11, 5) and out.codes.shape == (11, 7)
    assert sae.encode(X).shape == (11, 7) and sae.decode(torch.zeros(3, 7)).shape == (3, 5)


def test_numpy_in_numpy_out():
    sae = random_sae()
    X = np.random.default_rng(0).normal(size=(4, 5))
    rec, codes = sae(X)
    assert isinstance(rec, np.ndarray) and isinstance(codes, np.ndarray)
    assert np.allclose(rec, sae.decode(codes))
    Xc, D, Z = sae.joint_view(X)
    assert all(isinstance(a, np.ndarray) for a in (Xc, D, Z))


def test_loss_equals_companion_sae_loss():
    sae = random_sae()
    X = torch.randn(20, 5, dtype=torch.float64, generator=companion.generator(1))
    assert sae.loss(X, LAM).item() == pytest.approx(sae_loss(X, *params(sae), LAM), rel=1e-12)


def test_rescaling_a_latent_leaves_the_loss_unchanged():
    sae = random_sae()
    X = torch.randn(20, 5, dtype=torch.float64, generator=companion.generator(2))
    before = sae.loss(X, LAM).item()
    with torch.no_grad():
        for k, c in [(0, 3.0), (4, 0.2)]:
            sae.W_dec[k] *= c
            sae.W_enc[:, k] /= c
            sae.b_enc[k] /= c
    assert sae.loss(X, LAM).item() == pytest.approx(before, rel=1e-12)


def test_joint_view_is_a_point_of_the_joint_problem():
    sae = random_sae()
    X = torch.randn(20, 5, dtype=torch.float64, generator=companion.generator(3))
    Xc, D, Z = sae.joint_view(X)
    assert torch.allclose(D.norm(dim=1), torch.ones(7, dtype=torch.float64))
    assert torch.allclose(Z @ D + sae.b_dec, sae(X).reconstruction)
    assert joint_loss(Xc, D, Z, LAM) == pytest.approx(sae.loss(X, LAM).item(), rel=1e-12)


def test_training_lowers_the_loss_and_is_reproducible(data, trained):
    h = trained.loss_history
    assert len(h) == 150
    assert np.mean(h[-20:]) < 0.8 * np.mean(h[:5])
    assert trained.final_loss == pytest.approx(trained.sae.loss(data.X, LAM).item(), rel=1e-12)
    again = train_sae(data.X, 8, LAM, steps=150, batch_size=64, lr=3e-3, seed=0, progress=False)
    for p, q in zip(trained.sae.parameters(), again.sae.parameters()):
        assert torch.equal(p, q)
    other = train_sae(data.X, 8, LAM, steps=5, batch_size=64, lr=3e-3, seed=1, progress=False)
    assert not torch.equal(other.sae.W_dec, again.sae.W_dec)


def test_initialisation_and_fixed_decoder_bias(data):
    res = train_sae(data.X.numpy(), 8, LAM, steps=3, seed=0, learn_decoder_bias=False,
                    progress=False)
    sae = res.sae
    assert sae.W_dec.dtype == torch.float64
    assert torch.allclose(sae.b_dec, data.X.mean(0))
    assert res.lam == LAM and res.seed == 0


def test_zero_decoder_bias_full_batch_is_the_plain_adam_loop(data):
    """decoder_bias="zero" + a full batch is Adam on the joint problem's amortised form:
    b_dec stays 0, atoms start at normalised data rows, and the result equals a hand-written
    full-batch loop step for step."""
    X = data.X[:300]
    res = train_sae(X, 6, LAM, steps=40, batch_size=10_000, lr=1e-2, seed=3,
                    decoder_bias="zero", learn_decoder_bias=False, progress=False, num_threads=1)
    assert torch.equal(res.sae.b_dec, torch.zeros_like(res.sae.b_dec))
    sae = VanillaSAE(X.shape[1], 6, dtype=X.dtype)
    rows = torch.randperm(X.shape[0], generator=companion.generator(3))[:6]
    with torch.no_grad():
        sae.W_dec.copy_(X[rows] / X[rows].norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    opt = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec], lr=1e-2)
    with companion.runtime.cpu_threads(1):
        for _ in range(40):
            opt.zero_grad()
            sae.loss(X, LAM).backward()
            opt.step()
    for name in ("W_enc", "b_enc", "W_dec"):
        torch.testing.assert_close(getattr(res.sae, name), getattr(sae, name), rtol=0, atol=1e-12)


def test_training_restores_the_thread_count(data):
    before = torch.get_num_threads()
    train_sae(data.X, 8, LAM, steps=2, num_threads=1, progress=False)
    assert torch.get_num_threads() == before


def test_exact_codes_never_lose_to_the_encoder(data, trained):
    gap = companion.amortisation_gap(trained.sae, data.X, LAM)
    assert gap.sae_loss == pytest.approx(trained.sae.loss(data.X, LAM).item(), rel=1e-10)
    assert gap.gap >= -1e-12
    assert gap.exact_loss <= gap.sae_loss


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"lam": -1.0}, ValueError, "lam"),
        ({"n_latents": 0}, ValueError, "n_latents"),
        ({"steps": 2.5}, TypeError, "steps"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"init": "zeros"}, ValueError, "init"),
        ({"decoder_bias": "learned"}, ValueError, "decoder_bias"),
        ({"X": np.ones(5)}, ValueError, "X"),
        ({"X": np.full((4, 3), np.nan)}, ValueError, "X"),
        ({"X": [[1.0, 2.0]]}, TypeError, "X"),
        ({"n_latents": 50}, ValueError, "n_latents"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
        ({"num_threads": 0}, ValueError, "num_threads"),
    ],
)
def test_train_sae_rejects_bad_inputs(kwargs, exc, match):
    args = {"X": np.random.default_rng(0).normal(size=(10, 3)), "n_latents": 4, "lam": 0.1}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        train_sae(args.pop("X"), args.pop("n_latents"), args.pop("lam"), steps=args.pop("steps", 2),
                  progress=False, **args)


def test_module_rejects_bad_inputs():
    with pytest.raises(ValueError, match="d_sae"):
        VanillaSAE(3, 0)
    sae = VanillaSAE(3, 4)
    with pytest.raises(ValueError, match="X must have 3 columns"):
        sae.encode(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="X is a torch.float64 tensor but this SAE"):
        sae.encode(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="lam"):
        sae.loss(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="W_dec has zero rows"):
        sae.dictionary()
    with pytest.raises(TypeError, match="sae"):
        companion.amortisation_gap("not an sae", np.zeros((2, 3)), 0.1)


def test_a_tensor_of_another_dtype_is_refused_with_the_fix():
    sae = random_sae(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"float32 tensor but this SAE's parameters are torch.float64: "
                                        r"pass X.to\(torch.float64\)"):
        sae.encode(torch.zeros(2, 5))


def test_plateau_fall_is_the_relative_fall_between_the_last_two_fifths():
    history = [9.0] * 60 + [4.0] * 20 + [2.0] * 20        # fifths: ..., mean 4, then mean 2
    assert companion.plateau_fall(history) == pytest.approx(1.0)
    assert companion.plateau_fall([3.0] * 50) == 0.0
    # 2.00, 1.99, ..., 1.00: the last 50 steps average 1.245, the 50 before them 1.745
    assert companion.plateau_fall(np.linspace(2.0, 1.0, 101), tail=0.5) == pytest.approx(0.5 / 1.245)


@pytest.mark.parametrize("history, tail, match", [
    ([1.0] * 4, 0.2, "at least one step"),
    ([1.0] * 10, 0.7, "tail"),
    ([1.0] * 9 + [float("nan")], 0.2, "NaN"),
])
def test_plateau_fall_rejects_bad_inputs(history, tail, match):
    with pytest.raises(ValueError, match=match):
        companion.plateau_fall(history, tail=tail)


def test_held_out_curve_is_the_loss_on_eval_X(data):
    X = torch.as_tensor(data.X)
    E = X[::3] + 0.1
    run = train_sae(X, 8, 0.1, steps=30, batch_size=32, seed=0, progress=False, eval_X=E, eval_every=10)
    assert [s for s, _ in run.eval_history] == [0, 10, 20, 30]
    assert run.eval_history[-1][1] == pytest.approx(float(run.sae.loss(E, 0.1).detach()), rel=1e-12)
    plain = train_sae(X, 8, 0.1, steps=30, batch_size=32, seed=0, progress=False)
    assert torch.equal(plain.sae.W_dec, run.sae.W_dec) and plain.eval_history == []   # evaluation changes nothing
    with pytest.raises(ValueError, match="eval_X"):
        train_sae(X, 8, 0.1, steps=2, eval_X=E[:, :2], progress=False)
