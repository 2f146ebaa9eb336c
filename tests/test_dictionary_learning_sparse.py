"""dictionary_learning TopK, BatchTopK and JumpReLU checkpoints read by load_sae (companion.interop, Chapter 9).

Two kinds of evidence that the SparseSAE read from an ``ae.pt`` is dictionary_learning's SAE:

* fixtures written by the real library (dictionary_learning 0.1.0, ``tests/data/
  dictionary_learning_sparse/make_fixtures.py``): its trainers' own ``config.json``, its
  classes' own state dicts, and its own ``encode``/``decode`` outputs, which the loaded SAE
  must reproduce;
* state dicts built here in the classes' layout, against the forward pass written out below
  from the library's source (and checked against the library's outputs on the fixtures).
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from companion.beyond_l1 import SparseCheckpoint, SparseSAE
from companion.cli import main
from companion.interop import CheckpointError, CheckpointWarning, certify_checkpoint, load_sae, save_sae
from companion.sae import VanillaSAE

FIXTURES = pathlib.Path(__file__).resolve().parent / "data" / "dictionary_learning_sparse"
KINDS = ("topk", "batchtopk", "jumprelu")


# ---------------------------------------------------------------------------------------------
# dictionary_learning's forward passes, written out from its source (float64)
# ---------------------------------------------------------------------------------------------

def dl_topk_encode(state, x):
    """AutoEncoderTopK.encode (use_threshold=False): the k largest of ReLU(encoder(x - b_dec))."""
    post = torch.relu((x - state["b_dec"].double()) @ state["encoder.weight"].double().T
                      + state["encoder.bias"].double())
    vals, idx = post.topk(int(state["k"]), dim=-1)
    return torch.zeros_like(post).scatter(-1, idx, vals)


def dl_batchtopk_encode(state, x):
    """BatchTopKSAE.encode (use_threshold=True, inference): ReLU(h) kept where it exceeds the threshold."""
    post = torch.relu((x - state["b_dec"].double()) @ state["encoder.weight"].double().T
                      + state["encoder.bias"].double())
    return post * (post > state["threshold"].double())


def dl_linear_decode(state, f):
    """AutoEncoderTopK.decode and BatchTopKSAE.decode: decoder(f) + b_dec."""
    return f @ state["decoder.weight"].double().T + state["b_dec"].double()


def dl_jumprelu_encode(state, x):
    """JumpReluAutoEncoder.encode (apply_b_dec_to_input False): ReLU(h [h > threshold]), h = x W_enc + b_enc."""
    h = x @ state["W_enc"].double() + state["b_enc"].double()
    return torch.relu(h * (h > state["threshold"].double()))


def dl_jumprelu_decode(state, f):
    return f @ state["W_dec"].double() + state["b_dec"].double()


ENCODE = {"topk": dl_topk_encode, "batchtopk": dl_batchtopk_encode, "jumprelu": dl_jumprelu_encode}
DECODE = {"topk": dl_linear_decode, "batchtopk": dl_linear_decode, "jumprelu": dl_jumprelu_decode}
CLASSES = {"topk": ("TopKTrainer", "AutoEncoderTopK"), "batchtopk": ("BatchTopKTrainer", "BatchTopKSAE"),
           "jumprelu": ("JumpReluTrainer", "JumpReluAutoEncoder")}


def random_state(kind, d_in=5, d_sae=9, k=3, seed=0):
    """A state dict in the class's own layout: random weights, non-unit decoder rows, float32."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if kind == "jumprelu":
        return {"W_enc": r(d_in, d_sae), "b_enc": 0.5 * r(d_sae), "W_dec": 1.5 * r(d_sae, d_in),
                "b_dec": 0.5 * r(d_in), "threshold": torch.rand(d_sae, generator=g)}
    return {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(0.4 if kind == "batchtopk" else -1.0),
            "decoder.weight": 1.5 * r(d_in, d_sae), "encoder.weight": r(d_sae, d_in),
            "encoder.bias": 0.5 * r(d_sae), "b_dec": 0.5 * r(d_in)}


def write(path, state, kind=None, **trainer_cfg):
    """``ae.pt`` and, for ``kind``, the trainer's config.json (``{"trainer": {...}}``) as trainSAE writes it."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "ae.pt")
    if kind is not None:
        trainer, dict_class = CLASSES[kind]
        cfg = {"trainer_class": trainer, "dict_class": dict_class, **trainer_cfg}
        (path / "config.json").write_text(json.dumps({"trainer": cfg}))
    return path


def inputs(n=30, d_in=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64) * 1.5 + 0.3


# ---------------------------------------------------------------------------------------------
# the real library's checkpoints and outputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_the_real_librarys_checkpoints_reproduce_its_codes_and_reconstructions(kind):
    ref = np.load(FIXTURES / kind / "reference.npz")
    for where in (FIXTURES / kind, FIXTURES / kind / "ae.pt"):
        ck = load_sae(where)
        assert isinstance(ck, SparseCheckpoint) and isinstance(ck.sae, SparseSAE)
        assert ck.architecture == kind and ck.sae.architecture == kind
        assert ck.path == FIXTURES / kind / "ae.pt" and ck.sae.W_dec.dtype == torch.float64
        assert (ck.sae.d_in, ck.sae.d_sae) == (6, 10)
        assert ck.k == (None if kind == "jumprelu" else 3.0) and ck.eps is None
        z = ck.sae.encode(ref["x"])
        assert np.abs(z - ref["codes"]).max() < 1e-6 * max(1.0, np.abs(ref["codes"]).max())
        assert np.abs(ck.sae.decode(z) - ref["reconstruction"]).max() < 1e-6 * np.abs(ref["reconstruction"]).max()
        assert ((z > 0) == (ref["codes"] > 0)).all()            # the same supports, exactly
    # the forward written out in this file is the library's too
    state = torch.load(FIXTURES / kind / "ae.pt", weights_only=True)
    x = torch.from_numpy(ref["x"])
    assert torch.allclose(ENCODE[kind](state, x), torch.from_numpy(ref["codes"]), atol=1e-6)
    assert torch.allclose(DECODE[kind](state, torch.from_numpy(ref["codes"])),
                          torch.from_numpy(ref["reconstruction"]), atol=1e-6)
    f32 = load_sae(FIXTURES / kind, dtype=torch.float32)
    assert f32.sae.W_dec.dtype == torch.float32
    assert np.abs(f32.sae(ref["x"].astype(np.float32)) - ref["reconstruction"]).max() < 1e-4


def test_what_the_real_configs_say_about_k_and_eps():
    topk, batch, jump = (load_sae(FIXTURES / kind) for kind in KINDS)
    assert topk.sae.k == 3 and "budget k" in topk.eps_source
    assert batch.k == 3.0 and "price eps is not recorded" in batch.eps_source
    assert torch.equal(batch.sae.threshold, torch.full((10,), float(torch.tensor(0.8, dtype=torch.float32)),
                                                         dtype=torch.float64))
    for words in ("sparsity_penalty * (L0 / target_l0 - 1)^2", "target_l0=20.0", "pass eps"):
        assert words in jump.eps_source
    assert jump.cfg["trainer"]["trainer_class"] == "JumpReluTrainer"


# ---------------------------------------------------------------------------------------------
# layout-faithful state dicts against the forward pass written out above
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_parameter_maps_onto_the_sparse_sae(tmp_path, kind):
    state = random_state(kind)
    ck = load_sae(write(tmp_path, state, kind, k=3, activation_dim=5, dict_size=9))
    x = inputs()
    z = ck.sae.encode(x)
    assert torch.allclose(z, ENCODE[kind](state, x), atol=1e-12, rtol=0)
    assert torch.allclose(ck.sae.decode(z), DECODE[kind](state, z), atol=1e-12, rtol=0)
    assert (z > 0).sum(1).max() <= 3 if kind == "topk" else (z > 0).any()
    s = ck.sae
    if kind == "jumprelu":
        assert torch.equal(s.W_enc, state["W_enc"].double()) and torch.equal(s.W_dec, state["W_dec"].double())
        assert torch.equal(s.threshold, state["threshold"].double())
        # the encoder never subtracted b_dec: folded exactly into b_enc
        assert torch.allclose(s.b_enc, state["b_enc"].double() + state["b_dec"].double() @ state["W_enc"].double(),
                              atol=1e-14)
    else:
        assert torch.equal(s.W_enc, state["encoder.weight"].double().T)
        assert torch.equal(s.W_dec, state["decoder.weight"].double().T)
        assert torch.equal(s.b_enc, state["encoder.bias"].double())
    assert torch.equal(s.b_dec, state["b_dec"].double()) and not s.rescale_acts_by_decoder_norm


def test_early_jumprelu_codes_times_decoder_norms_are_the_unit_atom_codes(tmp_path):
    """An early JumpReluAutoEncoder returned f ‖W_dec[k]‖ from encode and divided it back in decode:
    the same reconstruction, and its codes are joint_view's codes on unit atoms."""
    state = random_state("jumprelu")
    ck = load_sae(write(tmp_path, state, "jumprelu"))
    x = inputs()
    norms = state["W_dec"].double().norm(dim=1)
    early_f = dl_jumprelu_encode(state, x) * norms
    _, D, Z = ck.sae.joint_view(x)
    assert torch.allclose(Z, early_f, atol=1e-12)
    assert torch.allclose(ck.sae(x), (early_f / norms) @ state["W_dec"].double() + state["b_dec"].double(),
                          atol=1e-12)


def test_a_jumprelu_state_dict_needs_no_config_but_topk_keys_do(tmp_path):
    ck = load_sae(write(tmp_path / "j", random_state("jumprelu")))
    assert ck.architecture == "jumprelu" and ck.eps is None and "no config.json" in ck.eps_source
    for kind in ("topk", "batchtopk"):
        with pytest.raises(CheckpointError, match="AutoEncoderTopK or BatchTopKSAE.*no config.json beside it"):
            load_sae(write(tmp_path / kind, random_state(kind)))
    d = write(tmp_path / "nodc", random_state("topk"))
    (d / "config.json").write_text(json.dumps({"trainer": {"lr": 1e-3}}))
    with pytest.raises(CheckpointError, match="has no dict_class or trainer_class"):
        load_sae(d)


def test_trainer_class_alone_or_dict_class_alone_decides(tmp_path):
    state = random_state("batchtopk")
    for i, cfg in enumerate(({"trainer_class": "BatchTopKTrainer"}, {"dict_class": "BatchTopKSAE"})):
        d = write(tmp_path / str(i), state)
        (d / "config.json").write_text(json.dumps({"trainer": cfg}))
        assert load_sae(d).architecture == "batchtopk"


def test_early_trainer_jumprelu_eps_is_half_its_sparsity_penalty(tmp_path):
    state = random_state("jumprelu")
    d = write(tmp_path / "a", state)
    (d / "config.json").write_text(json.dumps({"trainer": {"trainer_class": "TrainerJumpRelu",
                                                           "dict_class": "JumpReluAutoEncoder",
                                                           "sparsity_penalty": 0.3}}))
    ck = load_sae(d)
    assert ck.eps == pytest.approx(0.15) and "sparsity_penalty / 2" in ck.eps_source
    (d / "config.json").write_text(json.dumps({"trainer": {"trainer_class": "TrainerJumpRelu"}}))
    ck = load_sae(d)
    assert ck.eps is None and "records no sparsity_penalty" in ck.eps_source
    (d / "config.json").write_text(json.dumps({"trainer": {"trainer_class": "TrainerJumpRelu",
                                                           "sparsity_penalty": -1}}))
    with pytest.raises(CheckpointError, match="sparsity_penalty"):
        load_sae(d)


def test_a_batchtopk_threshold_never_set_is_a_plain_relu_with_a_warning(tmp_path):
    state = random_state("batchtopk")
    state["threshold"] = torch.tensor(-1.0)
    with pytest.warns(CheckpointWarning, match="threshold = -1 < 0.*plain ReLU"):
        ck = load_sae(write(tmp_path, state, "batchtopk"))
    x = inputs()
    relu = torch.relu((x - state["b_dec"].double()) @ state["encoder.weight"].double().T
                      + state["encoder.bias"].double())
    assert torch.allclose(ck.sae.encode(x), relu, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# bad inputs name the parameter
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_missing_wrong_shaped_and_nan_parameters_are_named(tmp_path, kind):
    required = [n for n in random_state(kind) if n != "k" and not (kind == "topk" and n == "threshold")]
    for name in required:
        state = random_state(kind)
        del state[name]
        with pytest.raises(CheckpointError, match=rf"missing the tensors \['{name}'\]"):
            load_sae(write(tmp_path / f"miss_{name}", state, kind, k=3))
    first = "W_enc" if kind == "jumprelu" else "encoder.weight"
    for name in required:
        state = random_state(kind)
        if name == first:      # it fixes d_in and d_sae: it must be 2-D
            state[name] = state[name].reshape(-1)
            match = rf"{name} must be a 2-dimensional tensor"
        else:
            state[name] = torch.zeros(*[s + 1 for s in state[name].shape]) if state[name].ndim else torch.zeros(3)
            match = rf"{name} has shape {tuple(state[name].shape)}".replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(CheckpointError, match=match):
            load_sae(write(tmp_path / f"shape_{name}", state, kind, k=3))
        state = random_state(kind)
        state[name] = state[name].clone().reshape(-1)
        state[name][0] = float("nan")
        state[name] = state[name].reshape(random_state(kind)[name].shape)
        with pytest.raises(CheckpointError, match=rf"{name} contains NaN"):
            load_sae(write(tmp_path / f"nan_{name}", state, kind, k=3))
    state = random_state(kind)
    state["r_mag"] = torch.zeros(9)
    with pytest.raises(CheckpointError, match=r"\['r_mag'\]"):
        load_sae(write(tmp_path / "extra", state, kind, k=3))
    with pytest.raises(CheckpointError, match="activation_dim=7"):
        load_sae(write(tmp_path / "dim", random_state(kind), kind, activation_dim=7))
    with pytest.raises(CheckpointError, match="dict_size=4"):
        load_sae(write(tmp_path / "size", random_state(kind), kind, dict_size=4))


def test_k_missing_invalid_or_disagreeing_is_named(tmp_path):
    for kind in ("topk", "batchtopk"):
        state = random_state(kind)
        del state["k"]
        with pytest.raises(CheckpointError, match="k is missing"):
            load_sae(write(tmp_path / f"{kind}_nok", state, kind))
        assert load_sae(write(tmp_path / f"{kind}_cfgk", state, kind, k=2)).k == 2.0     # config.json's k
        for bad, match in ((torch.tensor(0, dtype=torch.int), r"k=0 must lie in \[1, d_sae=9\]"),
                           (torch.tensor(10, dtype=torch.int), r"k=10 must lie in \[1, d_sae=9\]"),
                           (torch.tensor(2.5), "k must be an integer, got 2.5"),
                           (torch.tensor([2, 3]), "k must be one integer"),
                           (torch.tensor(True), "k must be one integer")):
            state = random_state(kind)
            state["k"] = bad
            with pytest.raises(CheckpointError, match=match):
                load_sae(write(tmp_path / f"{kind}_bad", state, kind))
        with pytest.raises(CheckpointError, match=r"k: .* holds k=3 but .* says k=4"):
            load_sae(write(tmp_path / f"{kind}_dis", random_state(kind), kind, k=4))
        with pytest.raises(CheckpointError, match="k must be an integer"):
            load_sae(write(tmp_path / f"{kind}_cfgbad", random_state(kind), kind, k="three"))
    state = random_state("batchtopk")
    state["threshold"] = torch.zeros(9)
    with pytest.raises(CheckpointError, match=r"threshold has shape \(9,\), expected \(\)"):
        load_sae(write(tmp_path / "thr", state, "batchtopk"))


def test_unknown_or_disagreeing_classes_are_refused_by_name(tmp_path):
    d = write(tmp_path / "u", random_state("topk"))
    (d / "config.json").write_text(json.dumps({"trainer": {"trainer_class": "TopKTrainer",
                                                           "dict_class": "MyTopK"}}))
    with pytest.raises(CheckpointError, match="dict_class 'MyTopK' is not a dictionary class read here"):
        load_sae(d)
    (d / "config.json").write_text(json.dumps({"trainer": {"trainer_class": "TopKTrainer",
                                                           "dict_class": "BatchTopKSAE"}}))
    with pytest.raises(CheckpointError, match="trainer_class 'TopKTrainer' .* dict_class is 'BatchTopKSAE'"):
        load_sae(d)
    (d / "config.json").write_text(json.dumps({"trainer": {"dict_class": "MatryoshkaBatchTopKSAE"}}))
    with pytest.raises(CheckpointError, match="Matryoshka BatchTopK SAE, not supported"):
        load_sae(d)


# ---------------------------------------------------------------------------------------------
# certificates: from Python and from the command line
# ---------------------------------------------------------------------------------------------

def test_certify_checkpoint_takes_eps_for_a_dictionary_learning_jumprelu(tmp_path):
    X = np.random.default_rng(0).normal(size=(60, 6)) + 0.3
    with pytest.raises(ValueError, match="give eps"):
        certify_checkpoint(FIXTURES / "jumprelu", X, progress=False)
    cert = certify_checkpoint(FIXTURES / "jumprelu", X, eps=0.05, matched_l1=False, progress=False)
    assert cert.architecture == "jumprelu" and cert.eps == 0.05 and cert.n_samples == 60
    with pytest.raises(ValueError, match="eps applies to JumpReLU and BatchTopK"):
        certify_checkpoint(FIXTURES / "topk", X, eps=0.05, progress=False)
    d = tmp_path / "early"
    shutil.copytree(FIXTURES / "jumprelu", d)
    (d / "config.json").write_text(json.dumps({"trainer": {"trainer_class": "TrainerJumpRelu",
                                                           "sparsity_penalty": 0.1}}))
    with pytest.raises(ValueError, match="disagrees with the checkpoint's eps=0.05"):
        certify_checkpoint(d, X, eps=0.2, progress=False)
    assert certify_checkpoint(d, X, eps=0.2, override=True, matched_l1=False, progress=False).eps == 0.2
    assert certify_checkpoint(d, X, matched_l1=False, progress=False).eps == pytest.approx(0.05)


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_the_cli_prints_chapter_9s_certificates_for_dictionary_learning(tmp_path, capsys, kind):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).normal(size=(200, 6)) + 0.3)
    assert main(["certify", str(FIXTURES / kind), str(acts), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert f"ae.pt  ({kind}; d_in=6, d_sae=10; k = 3; no eps" in out and "200 rows" in out
    for words in ("support-refit gap", "local moves", "plain-centroid stationarity", "matched L1"):
        assert words in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["architecture"] == kind and report["k"] == 3 and report["n_samples"] == 200
    assert main(["certify", str(FIXTURES / kind), str(acts), "--lam", "0.1"]) == 2
    assert "--lam applies to L1 SAEs" in capsys.readouterr().err


def test_the_cli_certifies_a_dictionary_learning_jumprelu_at_the_eps_it_is_given(tmp_path, capsys):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).normal(size=(50, 6)))
    assert main(["certify", str(FIXTURES / "jumprelu"), str(acts)]) == 2
    err = capsys.readouterr().err
    assert "records no price eps" in err and "give it with --eps" in err
    assert main(["certify", str(FIXTURES / "jumprelu"), str(acts), "--eps", "0.05",
                 "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "eps = 0.05 (from --eps)" in out and "local moves (eps=0.05)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["eps"] == 0.05 and report["eps_source"] == "--eps"
    for bad in (["--eps", "-1"], ["--eps", "0"]):
        assert main(["certify", str(FIXTURES / "jumprelu"), str(acts), *bad]) == 2
        assert "eps must be" in capsys.readouterr().err
    assert main(["certify", str(FIXTURES / "topk"), str(acts), "--eps", "0.05"]) == 2
    assert "eps applies to JumpReLU and BatchTopK" in capsys.readouterr().err


def test_the_cli_refuses_an_eps_that_disagrees_with_the_checkpoint_unless_overridden(tmp_path, capsys):
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).normal(size=(50, 6)))
    d = tmp_path / "early"
    shutil.copytree(FIXTURES / "jumprelu", d)
    (d / "config.json").write_text(json.dumps({"trainer": {"trainer_class": "TrainerJumpRelu",
                                                           "sparsity_penalty": 0.1}}))
    assert main(["certify", str(d), str(acts), "--eps", "0.2"]) == 2
    assert "disagrees with the checkpoint's eps=0.05" in capsys.readouterr().err
    assert main(["certify", str(d), str(acts), "--eps", "0.2", "--override-eps"]) == 0
    assert "eps = 0.2 (from --eps)" in capsys.readouterr().out


def test_the_cli_refuses_eps_for_an_l1_sae(tmp_path, capsys):
    ck = tmp_path / "l1"
    torch.manual_seed(0)
    save_sae(VanillaSAE(6, 4), ck, lam=0.1)
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).normal(size=(20, 6)))
    assert main(["certify", str(ck), str(acts), "--eps", "0.05"]) == 2
    assert "--eps applies to JumpReLU and BatchTopK SAEs" in capsys.readouterr().err
