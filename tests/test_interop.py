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
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"l1_penalty": 0.1}}))
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
    with pytest.raises(CheckpointError, match="only a vanilla SAE"):
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


def test_other_losses_imply_no_lam_and_normalisation_warns(tmp_path):
    sae = random_sae()
    ck = load_sae(saelens_dir(tmp_path / "a", sae, {"l1_coefficient": 0.2, "lp_norm": 0.5}))
    assert ck.lam is None and "lp_norm=0.5" in ck.lam_source
    with pytest.warns(CheckpointWarning, match="normalize_activations='expected_average_only_in'"):
        load_sae(saelens_dir(tmp_path / "b", sae, {"normalize_activations": "expected_average_only_in"}))


def test_save_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        save_sae(random_sae(), tmp_path, lam=0.0)
    with pytest.raises(ValueError, match=r"may not overwrite the fields \['d_in'\]"):
        save_sae(random_sae(), tmp_path, lam=0.1, extra_cfg={"d_in": 3})
    with pytest.raises(TypeError, match="sae must be a VanillaSAE"):
        save_sae(np.zeros(3), tmp_path, lam=0.1)
