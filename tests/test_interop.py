"""Loading and saving SAE checkpoints (companion.interop, Chapter 7)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from companion.interop import (
    CheckpointError,
    CheckpointWarning,
    LamMismatchError,
    checkpoint_lam,
    load_sae,
    save_sae,
)
from companion.sae import VanillaSAE


def random_sae(d_in=5, d_sae=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sae = VanillaSAE(d_in, d_sae, dtype=dtype)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return sae


def data(n=11, d_in=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64)


def saelens_dir(tmp_path, sae, cfg, tensors=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    t = tensors if tensors is not None else {k: getattr(sae, k).detach().clone() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


def test_save_then_load_round_trips_weights_forward_and_lam(tmp_path):
    sae = random_sae()
    save_sae(sae, tmp_path / "ck", lam=0.3, extra_cfg={"hook_name": "blocks.0.hook_resid_post"})
    ck = load_sae(tmp_path / "ck")
    assert ck.layout == "saelens"
    assert ck.lam == 0.3 and ck.l1_weighted_by_decoder_norm is True
    assert ck.cfg["l1_coefficient"] == 0.6 and ck.cfg["d_in"] == 5 and ck.cfg["d_sae"] == 7
    assert ck.cfg["hook_name"] == "blocks.0.hook_resid_post"
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(ck.sae, name), getattr(sae, name))
    X = data()
    assert torch.equal(ck.sae(X).reconstruction, sae(X).reconstruction)
    assert checkpoint_lam(ck) == 0.3


def test_float32_round_trip_and_dtype_override(tmp_path):
    sae = random_sae(dtype=torch.float32)
    save_sae(sae, tmp_path, lam=0.1)
    assert load_sae(tmp_path).sae.W_dec.dtype == torch.float32
    ck = load_sae(tmp_path / "sae_weights.safetensors", dtype=torch.float64)
    assert ck.sae.W_dec.dtype == torch.float64
    assert torch.equal(ck.sae.W_dec, sae.W_dec.double())


def test_saelens_l1_coefficient_means_twice_our_lam(tmp_path):
    sae = random_sae()
    ck = load_sae(saelens_dir(tmp_path, sae, {"d_in": 5, "d_sae": 7, "l1_coefficient": 0.8,
                                              "scale_sparsity_penalty_by_decoder_norm": True}))
    assert ck.lam == pytest.approx(0.4)
    # the SAELens training loss is exactly twice ours at λ = l1_coefficient / 2
    X = data()
    with torch.no_grad():
        Z = sae.encode(X)
        R = X - sae.decode(Z)
        saelens = float(((R ** 2).sum(1) + 0.8 * (Z * sae.W_dec.norm(dim=1)).sum(1)).mean())
        assert saelens == pytest.approx(2 * float(sae.loss(X, ck.lam)), rel=1e-12)


def test_saelens_without_b_dec_on_input_is_folded_exactly(tmp_path):
    sae = random_sae()
    ck = load_sae(saelens_dir(tmp_path, sae, {"d_in": 5, "d_sae": 7, "apply_b_dec_to_input": False}))
    X = data()
    theirs = torch.relu(X @ sae.W_enc + sae.b_enc)  # SAELens with apply_b_dec_to_input=false
    assert torch.allclose(ck.sae.encode(X), theirs, atol=1e-12)
    assert ck.lam is None


def test_dictionary_learning_layout(tmp_path):
    sae = random_sae()
    state = {"encoder.weight": sae.W_enc.detach().T.clone(), "encoder.bias": sae.b_enc.detach().clone(),
             "decoder.weight": sae.W_dec.detach().T.clone(), "bias": sae.b_dec.detach().clone()}
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"l1_penalty": 0.1}}))  # no trainer_class
    for where in (tmp_path, tmp_path / "ae.pt"):
        ck = load_sae(where)
        assert ck.layout == "dictionary_learning" and ck.lam is None
        assert ck.cfg["trainer"]["l1_penalty"] == 0.1
        X = data()
        # dictionary_learning's AutoEncoder: f = ReLU(encoder(x - bias)), x̂ = decoder(f) + bias
        f = torch.relu((X - state["bias"]) @ state["encoder.weight"].T + state["encoder.bias"])
        assert torch.allclose(ck.sae.encode(X), f, atol=1e-12)
        assert torch.allclose(ck.sae.decode(f), f @ state["decoder.weight"].T + state["bias"], atol=1e-12)
    with pytest.raises(ValueError, match="lam is required"):
        checkpoint_lam(ck)
    assert checkpoint_lam(ck, 0.25) == 0.25


def test_missing_keys_and_wrong_shapes_are_named(tmp_path):
    sae = random_sae()
    t = {k: getattr(sae, k).detach().clone() for k in ("W_enc", "b_enc", "W_dec")}
    with pytest.raises(CheckpointError, match=r"missing the tensors \['b_dec'\]"):
        load_sae(saelens_dir(tmp_path / "a", sae, {}, t))
    t["b_dec"] = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(CheckpointError, match=r"b_dec has shape \(4,\), expected \(5,\)"):
        load_sae(saelens_dir(tmp_path / "b", sae, {}, t))
    with pytest.raises(CheckpointError, match="d_sae=9"):
        load_sae(saelens_dir(tmp_path / "c", sae, {"d_sae": 9}))
    torch.save({"encoder.weight": torch.zeros(7, 5)}, tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match="missing the tensors"):
        load_sae(tmp_path / "ae.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds neither"):
        load_sae(tmp_path / "empty")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "cfg.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no sae_weights.safetensors"):
        load_sae(tmp_path / "d")


def test_other_architectures_are_refused(tmp_path):
    sae = random_sae()
    # a JumpReLU config goes to Chapter 9's loader, which wants the JumpReLU threshold
    with pytest.raises(CheckpointError, match="threshold"):
        load_sae(saelens_dir(tmp_path / "a", sae, {"architecture": "jumprelu"}))
    with pytest.raises(CheckpointError, match="only a vanilla SAE"):
        load_sae(saelens_dir(tmp_path / "b", sae, {"activation_fn": "topk"}))


def test_lam_mismatch_is_an_error_unless_overridden(tmp_path):
    save_sae(random_sae(), tmp_path, lam=0.3)
    ck = load_sae(tmp_path)
    assert checkpoint_lam(ck, 0.3 * (1 + 1e-9)) == pytest.approx(0.3)
    with pytest.raises(LamMismatchError, match=r"lam=0.6 disagrees with the checkpoint's λ=0.3"):
        checkpoint_lam(ck, 0.6)
    assert checkpoint_lam(ck, 0.6, override=True) == 0.6
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        checkpoint_lam(ck, -1.0)


def test_unweighted_l1_with_non_unit_decoder_is_refused(tmp_path):
    sae = random_sae()
    ck = load_sae(saelens_dir(tmp_path, sae, {"l1_coefficient": 0.2,
                                              "scale_sparsity_penalty_by_decoder_norm": False}))
    with pytest.raises(ValueError, match="not weighted by decoder norms"):
        checkpoint_lam(ck)
    assert checkpoint_lam(ck, override=True) == pytest.approx(0.1)


def test_other_losses_imply_no_lam(tmp_path):
    sae = random_sae()
    ck = load_sae(saelens_dir(tmp_path / "a", sae, {"l1_coefficient": 0.2, "lp_norm": 0.5}))
    assert ck.lam is None and "lp_norm=0.5" in ck.lam_source


def test_v6_metadata_and_runner_cfg_give_lam(tmp_path):
    """SAELens v6 keeps l1_coefficient under metadata.training_architecture_details."""
    sae = random_sae()
    v6 = {"d_in": 5, "d_sae": 7, "architecture": "standard", "normalize_activations": "none",
          "metadata": {"training_architecture": "standard",
                       "training_architecture_details": {"l1_coefficient": 0.8, "lp_norm": 1.0}}}
    with pytest.warns(CheckpointWarning, match="runner_cfg.json"):
        ck = load_sae(saelens_dir(tmp_path / "a", sae, v6))
    assert ck.lam == pytest.approx(0.4) and "training_architecture_details" in ck.lam_source
    assert ck.l1_weighted_by_decoder_norm is True
    d = saelens_dir(tmp_path / "b", sae, {"d_in": 5, "d_sae": 7})
    (d / "runner_cfg.json").write_text(json.dumps({"sae": {"l1_coefficient": 0.6, "normalize_activations": "none"}}))
    ck = load_sae(d)
    assert ck.lam == pytest.approx(0.3) and "runner_cfg.json" in ck.lam_source
    with pytest.raises(LamMismatchError):
        checkpoint_lam(ck, 0.6)


def test_folded_normalisation_needs_the_scale(tmp_path):
    """expected_average_only_in folded into the weights: λ = l1 / (2 s), s from the user."""
    sae = random_sae()
    d = saelens_dir(tmp_path / "a", sae, {"d_in": 5, "d_sae": 7, "normalize_activations": "none"})
    (d / "runner_cfg.json").write_text(json.dumps(
        {"sae": {"l1_coefficient": 0.8, "normalize_activations": "expected_average_only_in"}}))
    ck = load_sae(d)
    assert ck.lam is None and "activation_scale" in ck.lam_source
    with pytest.raises(ValueError, match="lam is required.*activation_scale"):
        checkpoint_lam(ck)
    ck = load_sae(d, activation_scale=4.0)
    assert ck.lam == pytest.approx(0.8 / 8) and ck.activation_scale == 4.0
    assert ck.normalize_activations == "expected_average_only_in"
    assert torch.equal(ck.sae.W_enc, sae.W_enc)          # already folded: weights unchanged
    with pytest.raises(CheckpointError, match="activation_scale"):
        load_sae(d, activation_scale=-1.0)


def test_unfolded_normalisation_is_folded_or_refused(tmp_path):
    """Weights still for s·x: folded here when s is known, refused when not."""
    sae = random_sae()
    cfg = {"d_in": 5, "d_sae": 7, "normalize_activations": "expected_average_only_in", "l1_coefficient": 0.8}
    d = saelens_dir(tmp_path / "a", sae, cfg)
    with pytest.raises(CheckpointError, match="pass activation_scale"):
        load_sae(d)
    (d / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.0}))
    ck = load_sae(d)
    assert ck.lam == pytest.approx(0.2) and ck.activation_scale == 2.0
    X = data()
    # the folded SAE on raw x equals SAELens' SAE on 2x, rescaled back
    assert torch.allclose(ck.sae.encode(X), sae.encode(2 * X), atol=1e-12)
    assert torch.allclose(ck.sae(X).reconstruction, sae(2 * X).reconstruction / 2, atol=1e-12)


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale", "covariance_whitening"])
def test_per_row_and_whitening_normalisations_are_refused(tmp_path, norm):
    with pytest.raises(CheckpointError, match=norm):
        load_sae(saelens_dir(tmp_path, random_sae(), {"normalize_activations": norm}))


def test_unknown_tensors_and_architectures_are_refused_by_name(tmp_path):
    sae = random_sae()
    t = {k: getattr(sae, k).detach().clone() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    t["threshold"] = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(CheckpointError, match=r"\['threshold'\]"):
        load_sae(saelens_dir(tmp_path / "a", sae, {}, t))
    for arch, name in (("gated", "gated"), ("matryoshka_batchtopk", "Matryoshka BatchTopK"),
                       ("transcoder", "transcoder")):
        with pytest.raises(CheckpointError, match=f"{name} SAE"):
            load_sae(saelens_dir(tmp_path / arch, sae, {"architecture": arch}))


def test_corrupt_and_malformed_files_are_checkpoint_errors(tmp_path):
    sae = random_sae()
    d = saelens_dir(tmp_path / "a", sae, {"d_in": 5})
    (d / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="could not read .* as safetensors"):
        load_sae(d)
    with pytest.raises(CheckpointError, match="d_in must be an integer"):
        load_sae(saelens_dir(tmp_path / "b", sae, {"d_in": "five"}))
    with pytest.raises(CheckpointError, match="d_in must be an integer"):
        load_sae(saelens_dir(tmp_path / "c", sae, {"d_in": 5.5}))


def dl_state(sae, new=False):
    state = {"encoder.weight": sae.W_enc.detach().T.clone(), "encoder.bias": sae.b_enc.detach().clone(),
             "decoder.weight": sae.W_dec.detach().T.clone()}
    state["decoder.bias" if new else "bias"] = sae.b_dec.detach().clone()
    return state


def dl_dir(path, state, trainer=None, dict_class="AutoEncoder", l1=0.1):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "ae.pt")
    if trainer is not None:
        (path / "config.json").write_text(json.dumps(
            {"trainer": {"trainer_class": trainer, "dict_class": dict_class, "l1_penalty": l1,
                         "activation_dim": 5, "dict_size": 7}}))
    return path


def test_dictionary_learning_trainers(tmp_path):
    sae = random_sae()
    ck = load_sae(dl_dir(tmp_path / "april", dl_state(sae), "StandardTrainerAprilUpdate", l1=0.3))
    assert ck.lam == pytest.approx(0.15) and ck.trainer == "StandardTrainerAprilUpdate"
    assert ck.l1_weighted_by_decoder_norm is True
    with pytest.raises(CheckpointError, match="unsquared error"):
        load_sae(dl_dir(tmp_path / "std", dl_state(sae), "StandardTrainer"))
    with pytest.raises(CheckpointError, match="Lp sparsity penalty"):
        load_sae(dl_dir(tmp_path / "pan", dl_state(sae), "PAnnealTrainer"))
    for trainer, dict_class, name in (("GatedSAETrainer", "GatedAutoEncoder", "gated"),
                                      ("MatryoshkaBatchTopKTrainer", "MatryoshkaBatchTopKSAE",
                                       "Matryoshka BatchTopK")):
        with pytest.raises(CheckpointError, match=f"{name} SAE, not supported"):
            load_sae(dl_dir(tmp_path / trainer, dl_state(sae), trainer, dict_class))
    # TopK, BatchTopK and JumpReLU configs are read for Chapter 9 (tests/test_dictionary_learning_sparse.py):
    # a vanilla state dict beside one is missing that architecture's tensors, named
    for trainer, dict_class, missing in (("TopKTrainer", "AutoEncoderTopK", "'b_dec'"),
                                         ("BatchTopKTrainer", "BatchTopKSAE", "'b_dec', 'threshold'"),
                                         ("JumpReluTrainer", "JumpReluAutoEncoder", "'W_enc'")):
        with pytest.raises(CheckpointError, match=f"missing the tensors \\[{missing}"):
            load_sae(dl_dir(tmp_path / trainer, dl_state(sae), trainer, dict_class))
    with pytest.raises(CheckpointError, match="dict_class 'Custom' is not a dictionary class read here"):
        load_sae(dl_dir(tmp_path / "custom", dl_state(sae), "StandardTrainerAprilUpdate", "Custom"))
    state = dl_state(sae)
    state["k"] = torch.tensor(4)
    with pytest.raises(CheckpointError, match=r"\['k'\]"):
        load_sae(dl_dir(tmp_path / "k", state))


def test_dictionary_learning_autoencoder_new_folds_the_decoder_bias(tmp_path):
    """AutoEncoderNew: f = ReLU(encoder(x)) with no centring, x̂ = decoder(f) (decoder.bias)."""
    sae = random_sae()
    state = dl_state(sae, new=True)
    ck = load_sae(dl_dir(tmp_path, state, "StandardTrainerAprilUpdate", "AutoEncoderNew", l1=0.2))
    X = data()
    f = torch.relu(X @ state["encoder.weight"].T + state["encoder.bias"])
    assert torch.allclose(ck.sae.encode(X), f, atol=1e-12)
    assert torch.allclose(ck.sae.decode(f), f @ state["decoder.weight"].T + state["decoder.bias"], atol=1e-12)
    assert ck.lam == pytest.approx(0.1)


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        save_sae(random_sae(), tmp_path, lam=0.0)
    with pytest.raises(ValueError, match=r"may not overwrite the fields \['d_in'\]"):
        save_sae(random_sae(), tmp_path, lam=0.1, extra_cfg={"d_in": 3})
    with pytest.raises(TypeError, match="sae must be a VanillaSAE"):
        save_sae(np.zeros(3), tmp_path, lam=0.1)


def test_certify_sae_streams_a_memory_map_like_certify_on_the_joint_view(tmp_path):
    """Chunked reading of a float32 memmap (cast per chunk) gives certify's numbers on the joint view."""
    from companion import certify
    from companion.interop import certify_sae
    sae = random_sae(d_in=5, d_sae=7)
    with torch.no_grad():
        sae.W_enc.mul_(0.3)
    X = data(n=97).numpy().astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    cert = certify_sae(sae, mm, 0.2, chunk_size=10)
    Xc, D, Z = sae.joint_view(torch.from_numpy(X).double())
    a, b = certify(Xc, D, 0.2, Z), certify(Xc, D, 0.2)
    for name in ("loss", "t1_violation", "t2_violation", "duality_gap", "l0", "fvu", "huber_bound"):
        assert getattr(cert.sae_codes, name) == pytest.approx(getattr(a, name), rel=1e-10, abs=1e-12), name
        assert getattr(cert.exact_codes, name) == pytest.approx(getattr(b, name), rel=1e-8, abs=1e-10), name
    assert cert.sae_codes.bias_stationarity == pytest.approx(float((Xc - Z @ D).mean(0).norm()), rel=1e-10)
    rows = np.array([3, 50, 7, 96])
    sub = certify_sae(sae, mm, 0.2, rows=rows, exact=False)
    assert sub.sae_codes.n_samples == 4
    assert sub.sae_codes.loss == pytest.approx(certify(Xc[rows], D, 0.2, Z[rows]).loss, rel=1e-10)
    assert json.loads(json.dumps(cert.to_dict()))["exact_codes"]["codes"] == "exact"


def test_certify_sae_refuses_empty_and_mismatched_inputs():
    from companion.interop import certify_sae
    sae = random_sae()
    with pytest.raises(ValueError, match="X has no rows"):
        certify_sae(sae, np.zeros((0, 5)), 0.1)
    with pytest.raises(ValueError, match="3 columns but the SAE has d_in=5"):
        certify_sae(sae, np.zeros((4, 3)), 0.1)
    bad = np.zeros((30, 5))
    bad[17, 1] = np.inf
    with pytest.raises(ValueError, match="first in row 17"):
        certify_sae(sae, bad, 0.1, chunk_size=8)
    with pytest.raises(TypeError, match="lam must be a positive number"):
        certify_sae(sae, np.zeros((4, 5)), "0.1")


def test_certify_checkpoint_takes_lam_from_the_checkpoint(tmp_path):
    """issue 23.1: λ where it lives; a Checkpoint into certify_sae; λ x2 or x1/2 warns."""
    from companion.interop import certify_checkpoint, certify_sae
    sae = random_sae()
    with torch.no_grad():
        sae.W_enc.mul_(0.3)
    save_sae(sae, tmp_path / "ck", lam=0.3)
    X = data(n=60)
    np.save(tmp_path / "x.npy", X.numpy())
    cert = certify_checkpoint(tmp_path / "ck", tmp_path / "x.npy", device="cpu", progress=False)
    assert cert.lam == 0.3 and cert.lam_source == "from the checkpoint: cfg.json companion_lam"
    ck = load_sae(tmp_path / "ck", dtype=torch.float64)
    same = certify_sae(ck, X)                                    # λ from the Checkpoint
    assert same.lam == 0.3 and same.exact_codes.loss == pytest.approx(cert.exact_codes.loss, rel=1e-12)
    assert certify_checkpoint(ck, X, progress=False, device="cpu").lam == 0.3
    with pytest.raises(LamMismatchError, match="disagrees"):
        certify_sae(ck, X, 0.6)
    with pytest.raises(LamMismatchError, match="disagrees"):
        certify_checkpoint(tmp_path / "ck", X, lam=0.6, progress=False)
    with pytest.warns(CheckpointWarning, match=r"lam=0.6 is twice the λ=0.3 .*l1_coefficient is 2λ"):
        certify_sae(ck.sae, X, 0.6, exact=False)                 # the module remembers its checkpoint's λ
    with pytest.warns(CheckpointWarning, match="half"):
        c = certify_checkpoint(tmp_path / "ck", X, lam=0.15, override=True, progress=False, exact=False)
    assert c.lam == 0.15 and "overriding the checkpoint's 0.3" in c.lam_source
    with pytest.raises(TypeError, match=r"lam is required .*certify_sae\(checkpoint, X\)"):
        certify_sae(ck.sae, X)
    with pytest.raises(TypeError, match="sae must be a VanillaSAE, a Checkpoint"):
        certify_sae(np.zeros(3), X, 0.3)
    with pytest.raises(TypeError, match="checkpoint must be a path or a Checkpoint"):
        certify_checkpoint(ck.sae, X)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_any_input_dtype_is_cast_chunk_by_chunk_like_numpy(dtype):
    """issue 23.4: a tensor of any dtype gives what the same values give as a float64 array."""
    from companion.interop import certify_sae
    sae = random_sae()
    X = (data(n=40) * 4).to(dtype)
    ref = certify_sae(sae, X.double().numpy(), 0.2, chunk_size=16)
    got = certify_sae(sae, X, 0.2, chunk_size=16)
    for name in ("loss", "t1_violation", "t2_violation"):
        assert getattr(got.exact_codes, name) == pytest.approx(getattr(ref.exact_codes, name), rel=1e-12)


def test_nan_is_found_before_the_pass_naming_file_and_row(tmp_path, monkeypatch):
    from companion import interop
    from companion.interop import certify_sae
    X = data(n=200).numpy()
    X[199, 3] = np.nan
    np.save(tmp_path / "acts.npy", X)
    mm = np.load(tmp_path / "acts.npy", mmap_mode="r")
    calls = []
    monkeypatch.setattr(interop._ExactCodes, "__call__", lambda self, X: calls.append(1))
    with pytest.raises(ValueError, match=f"first in row 199 of {tmp_path / 'acts.npy'} "
                                         r"\(found by a scan before certifying\)"):
        certify_sae(random_sae(), mm, 0.2, chunk_size=16)
    assert calls == []                                   # no exact code was computed
    with pytest.raises(ValueError, match="first in row 199"):
        certify_sae(random_sae(), mm, 0.2, rows=np.array([5, 199, 7]))


def test_clear_messages_for_pt_npz_cuda_and_dtype(tmp_path):
    from companion.interop import open_activations
    torch.save(torch.zeros(4, 5), tmp_path / "acts.pt")
    with pytest.raises(ValueError, match=r"torch.save file .*numpy.save\('acts.npy', torch.load"):
        open_activations(tmp_path / "acts.pt", 5)
    np.savez(tmp_path / "acts.npz", a=np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\.npz archive"):
        open_activations(tmp_path / "acts.npz", 5)
    save_sae(random_sae(), tmp_path / "ck", lam=0.3)
    with pytest.raises(TypeError, match="float16 and bfloat16 included, are cast to it chunk by chunk"):
        load_sae(tmp_path / "ck", dtype=torch.float16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda' is not usable here \(this torch has no CUDA"):
            load_sae(tmp_path / "ck", device="cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        load_sae(tmp_path / "ck", device="gpu0")


def test_progress_names_the_new_atom_searches(tmp_path, capsys, monkeypatch):
    """issue 23.5: with progress on, the new-atom searches are a named stage on stderr."""
    from companion.interop import certify_sae
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    certify_sae(random_sae(), data(n=30), 0.2, progress=True)
    err = capsys.readouterr().err
    for stage in ("scan rows for NaN/Inf", "read rows, SAE codes, exact codes", "new-atom searches"):
        assert f"certify_sae: {stage}" in err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    certify_sae(random_sae(), data(n=30), 0.2, progress=True)
    assert capsys.readouterr().err == ""
