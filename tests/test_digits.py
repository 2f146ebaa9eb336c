"""Hidden activations of a small digit classifier (companion.digits, Chapter 7)."""

import pytest
import torch

pytest.importorskip("sklearn")

from companion.digits import digits_activations  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return digits_activations(seed=0, hidden=16, steps=150)


def test_shapes_labels_and_split(small):
    assert small.activations.shape == (1797, 16)
    assert small.activations.dtype == torch.float64
    assert small.labels.shape == (1797,) and small.labels.dtype == torch.long
    assert set(small.labels.tolist()) == set(range(10))
    n_test = int((~small.is_train).sum())
    assert n_test == round(0.25 * 1797)
    assert small.site == "hidden" and small.seed == 0


def test_classifier_learns_and_hidden_layer_is_a_relu_output(small):
    # a 16-unit MLP separates the ten digits well above chance (0.1)
    assert small.accuracy > 0.85 and small.train_accuracy > 0.9
    assert bool((small.activations >= 0).all())


def test_same_seed_same_activations_and_other_seed_differs(small):
    again = digits_activations(seed=0, hidden=16, steps=150)
    assert torch.equal(again.activations, small.activations)
    assert torch.equal(again.is_train, small.is_train)
    other = digits_activations(seed=1, hidden=16, steps=150)
    assert not torch.equal(other.activations, small.activations)


def test_preactivation_site_dtype_and_device():
    r = digits_activations(seed=0, hidden=8, steps=20, site="preactivation", dtype=torch.float32,
                           device="cpu")
    assert r.activations.dtype == torch.float32
    assert bool((r.activations < 0).any())
    post = digits_activations(seed=0, hidden=8, steps=20)
    assert torch.allclose(torch.relu(r.activations).double(), post.activations, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden": 0}, "hidden must be >= 1"),
    ({"site": "output"}, "site must be one of"),
    ({"test_fraction": 1.0}, "test_fraction must lie strictly between 0 and 1"),
    ({"lr": -1.0}, "lr must be a finite number > 0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits_activations(**kwargs)


def test_bad_types_are_named():
    with pytest.raises(TypeError, match="seed must be an integer"):
        digits_activations(seed=0.5)
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        digits_activations(dtype=torch.float16)


def test_study_sae_keeps_the_loss_curve_and_orders_the_ladder(small):
    from companion.digits import study_sae

    X = small.activations[:300]
    s = study_sae(X, 6, 0.5, steps=50, batch_size=64, fit=True, fit_max_iter=500)
    assert len(s.loss_history) == 50
    assert s.sae_loss >= s.exact_loss >= s.fit.loss - 1e-12 >= s.huber - 1e-12
