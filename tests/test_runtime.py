"""companion.runtime: set-up, the data-perturbation switch and glue."""

import numpy as np
import pytest
import torch

import companion
from companion import runtime


@pytest.fixture
def perturbation_off():
    """Leave the switch off after each test, whatever the test set."""
    yield
    runtime.setup(0, perturb=0.0)


def test_perturbation_is_off_by_default_and_returns_the_same_tensor(perturbation_off, monkeypatch):
    monkeypatch.delenv("COMPANION_PERTURB", raising=False)
    companion.setup(0)
    X = torch.randn(5, 3, dtype=torch.float64)
    assert companion.perturb_data(X) is X


@pytest.mark.parametrize("dtype, size", [(torch.float64, 1e-12), (torch.float32, torch.finfo(torch.float32).eps)])
def test_perturbation_is_relative_fixed_and_leaves_the_random_streams_alone(perturbation_off, dtype, size):
    X = torch.randn(40, 7, dtype=torch.float64).to(dtype) + 2.0
    companion.setup(3, perturb=1e-12)
    before = torch.randn(4)
    companion.setup(3, perturb=1e-12)
    Y1, Y2 = companion.perturb_data(X), companion.perturb_data(X)
    after = torch.randn(4)
    assert torch.equal(before, after)                    # the chapter's stream is untouched
    assert torch.equal(Y1, Y2)                           # the same X, the same perturbation
    rel = ((Y1 - X) / X).abs()
    assert 0 < rel.max() <= 2.5 * size                  # relative, and not rounded away
    assert (rel > 0).float().mean() > 0.5


def test_perturbation_reaches_the_data_matrix_of_public_functions(perturbation_off):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    D = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=torch.float64), dim=1)
    companion.setup(0, perturb=0.0)
    Z0 = companion.encode(X, D, 0.1)
    companion.setup(0, perturb=1e-12)
    Z1 = companion.encode(X, D, 0.1)
    assert not torch.equal(Z0, Z1) and torch.allclose(Z0, Z1, atol=1e-9)


def test_perturbation_reads_the_environment_and_refuses_nonsense(perturbation_off, monkeypatch):
    monkeypatch.setenv("COMPANION_PERTURB", "1e-12")
    companion.setup(0)
    X = torch.ones(3, 3, dtype=torch.float64)
    assert not torch.equal(companion.perturb_data(X), X)
    for bad in (-1e-12, 0.5, float("nan")):
        with pytest.raises(ValueError, match="perturb"):
            companion.setup(0, perturb=bad)


def _glued(name, value, fmt=None):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shown = []
    publisher = shell.display_pub
    old = publisher.publish

    def publish(data, metadata=None, **kwargs):
        shown.append((data, metadata))

    publisher.publish = publish
    try:
        companion.glue(name, value, fmt)
    finally:
        publisher.publish = old
    return shown


def test_glue_stores_floats_at_the_digits_shown_in_myst_nb_format():
    [(data, meta)] = _glued("x", 12.405896186828613, ".2f")
    assert data == {"application/papermill.record/text/plain": "12.41"}
    assert meta["scrapbook"] == {"name": "x", "mime_prefix": "application/papermill.record/"}
    [(data, _)] = _glued("n", np.int64(7))
    assert data["application/papermill.record/text/plain"] == "7"
    [(data, _)] = _glued("t", torch.tensor(0.123456, dtype=torch.float64), ".3g")
    assert data["application/papermill.record/text/plain"] == "0.123"


def test_glue_refuses_a_float_without_a_format():
    with pytest.raises(ValueError, match="fmt"):
        _glued("x", 0.5)


def test_progress_bar_honours_the_flag_and_tqdm_disable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not companion.runtime.progress_bar(range(3), progress=True).disable
    assert companion.runtime.progress_bar(range(3), progress=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")           # how the stored outputs are executed
    assert companion.runtime.progress_bar(range(3), progress=True).disable
