"""companion.interop against the real SAELens (issue 13.3): SAEs built, trained and saved by
SAELens's own classes and code, loaded by companion, and the other way round.

SAELens is a test dependency (installed in the test environment); nothing here touches the
network: its trainer takes an iterator of activation tensors. Everything runs in float64 so
that agreement is to rounding (1e-12), well inside the issue's 1e-6.
"""

import json

import numpy as np
import pytest
import torch

from companion.interop import CheckpointError, certify_checkpoint, certify_sae, checkpoint_lam, load_sae, save_sae
from companion.sae import VanillaSAE
from helpers import quiet

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE, SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig  # noqa: E402
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402

D_IN, D_SAE, L1, BATCH, STEPS = 8, 16, 0.5, 128, 30

# tiny kernels: one thread is many times faster than two spinning ones on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


def batches(scale=3.0, seed=1):
    """Sparse nonnegative combinations of 12 fixed directions, as a SAELens data provider."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(12, D_IN, generator=g, dtype=torch.float64)
    F = F / F.norm(dim=1, keepdim=True)
    while True:
        c = torch.rand(BATCH, 12, generator=g, dtype=torch.float64)
        yield scale * (c * (torch.rand(BATCH, 12, generator=g) < 0.25)) @ F + 0.5


def train(normalize="none", n_norm_batches=4):
    cfg = StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=L1, dtype="float64",
                                    normalize_activations=normalize)
    torch.manual_seed(0)
    sae = StandardTrainingSAE(cfg)
    before = sae.cfg.to_dict()              # what SAELens's runner writes to runner_cfg.json
    trainer_cfg = SAETrainerConfig(total_training_samples=BATCH * STEPS, train_batch_size_samples=BATCH,
                                   lr=1e-2, lr_end=1e-2, n_batches_for_norm_estimate=n_norm_batches,
                                   logger=LoggingConfig(log_to_wandb=False))
    with quiet():
        SAETrainer(trainer_cfg, sae, data_provider=batches()).fit()
    return sae, before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    sae, _ = train()
    root = tmp_path_factory.mktemp("saelens")
    with quiet():
        sae.save_inference_model(root / "sae")
    return sae, root / "sae"


def held_out(n=300):
    return next(batches(seed=7))[:n]


def saelens_training_loss(sae, x, l1):
    step = TrainStepInput(sae_in=x, coefficients={"l1": l1}, dead_neuron_mask=None,
                          n_training_steps=0, is_logging_step=False)
    with torch.no_grad():
        return float(sae.training_forward_pass(step).loss)


def test_saelens_checkpoint_loads_with_its_lam_forward_pass_and_loss(trained):
    sae, path = trained
    with quiet():
        ck = load_sae(path, dtype=torch.float64)
    assert ck.lam == pytest.approx(L1 / 2) and "training_architecture_details" in ck.lam_source
    assert ck.l1_weighted_by_decoder_norm is True
    x = held_out()
    with torch.no_grad():
        assert torch.allclose(ck.sae.encode(x), sae.encode(x), atol=1e-12, rtol=0)
        assert torch.allclose(ck.sae(x).reconstruction, sae(x), atol=1e-12, rtol=0)
        ours = float(ck.sae.loss(x, ck.lam))
    # SAELens's training loss is twice the book's loss at λ = l1_coefficient / 2
    assert saelens_training_loss(sae, x, L1) / 2 == pytest.approx(ours, rel=1e-12)
    cert = certify_sae(ck.sae, x, ck.lam)
    assert cert.sae_codes.loss == pytest.approx(ours, rel=1e-12)
    assert cert.exact_codes.t1_violation <= 1e-8 and cert.amortisation_gap >= 0


def test_companion_save_loads_in_saelens_with_the_same_forward_pass(tmp_path):
    g = torch.Generator().manual_seed(3)
    ours = VanillaSAE(D_IN, D_SAE, dtype=torch.float64)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    save_sae(ours, tmp_path / "ours", lam=0.2)
    with quiet():
        theirs = SAE.load_from_disk(tmp_path / "ours")
    assert type(theirs).__name__ == "StandardSAE" and theirs.W_dec.dtype == torch.float64
    x = held_out()
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-12, rtol=0)
        assert torch.allclose(theirs(x), ours(x).reconstruction, atol=1e-12, rtol=0)
    assert load_sae(tmp_path / "ours").lam == 0.2


def test_gated_saelens_checkpoints_are_refused(tmp_path):
    with quiet():
        sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE)).save_model(tmp_path / "g")
    with pytest.raises(CheckpointError, match="gated SAE"):
        load_sae(tmp_path / "g")


@pytest.mark.parametrize("name, arch, cfg_kwargs", [("TopK", "topk", {"k": 4}), ("JumpReLU", "jumprelu", {})])
def test_topk_and_jumprelu_checkpoints_load_into_their_own_type(tmp_path, name, arch, cfg_kwargs):
    """load_sae reads them with Chapter 9's loader; certify_checkpoint gives its certificates,
    and certify_sae (the L1 certificate) refuses them with a pointer there."""
    from companion.beyond_l1 import SparseCheckpoint, SparseSAECertificate

    sae = getattr(sae_lens, f"{name}SAE")(getattr(sae_lens, f"{name}SAEConfig")(d_in=D_IN, d_sae=D_SAE, **cfg_kwargs))
    with quiet():
        sae.save_model(tmp_path / name)
    ck = load_sae(tmp_path / name)
    assert isinstance(ck, SparseCheckpoint) and ck.architecture == arch
    x = held_out()[:64]
    if arch == "topk":
        cert = certify_checkpoint(tmp_path / name, x, progress=False)
        assert isinstance(cert, SparseSAECertificate) and cert.k == 4
    with pytest.raises(TypeError, match="certify_checkpoint"):
        certify_sae(ck, x)
    with pytest.raises(CheckpointError, match="certify_checkpoint"):
        certify_sae(sae, x, 0.1)


def test_normalised_run_gets_lam_over_twice_the_scale(tmp_path):
    """expected_average_only_in: SAELens folds s into the weights; λ = l1 / (2 s) on the raw scale."""
    n_norm = 4
    sae, before = train("expected_average_only_in", n_norm)
    assert before["normalize_activations"] == "expected_average_only_in"
    assert sae.cfg.normalize_activations == "none"           # folded by SAETrainer.fit
    # the trainer's estimate: s = sqrt(d_in) / mean ‖x‖ over the first n_norm batches
    it = batches()
    norms = torch.cat([next(it).norm(dim=1) for _ in range(n_norm)])
    s = D_IN ** 0.5 / float(norms.mean())
    with quiet():
        sae.save_inference_model(tmp_path / "norm")
    (tmp_path / "norm" / "runner_cfg.json").write_text(json.dumps({"sae": before}))
    ck = load_sae(tmp_path / "norm", dtype=torch.float64)
    assert ck.lam is None and "activation_scale" in ck.lam_source
    with pytest.raises(ValueError, match="activation_scale"):
        checkpoint_lam(ck)
    ck = load_sae(tmp_path / "norm", dtype=torch.float64, activation_scale=s)
    assert ck.lam == pytest.approx(L1 / (2 * s), rel=1e-12)
    # the training objective (on s·x, weights unfolded) is 2 s² times the book loss at that λ
    x = held_out()
    with quiet():
        unfolded = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=L1,
                                                                 dtype="float64"))
    unfolded.load_state_dict(sae.state_dict())
    unfolded.fold_activation_norm_scaling_factor(1 / s)
    with torch.no_grad():
        book = float(ck.sae.loss(x, ck.lam))
    assert saelens_training_loss(unfolded, s * x, L1) == pytest.approx(2 * s * s * book, rel=1e-12)


def test_cli_on_a_saelens_checkpoint(trained, tmp_path, capsys):
    from companion.cli import main
    _, path = trained
    np.save(tmp_path / "acts.npy", held_out().numpy())
    code = main(["certify", str(path), str(tmp_path / "acts.npy"), "--no-progress", "--max-rows", "100"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"lambda       {L1 / 2:g}  (from the checkpoint: cfg.json metadata.training_architecture_details" in out.out
    assert "note         " in out.out and "runner_cfg.json" in out.out


def test_an_in_memory_saelens_sae_is_certified_with_its_own_lam(trained):
    """issue 23.1: certify_sae takes a sae_lens SAE of the standard architecture, λ = l1_coefficient / 2."""
    sae, path = trained
    x = held_out(120)
    with quiet():
        direct = certify_sae(sae, x)
        ck = load_sae(path, dtype=torch.float64)
        via = certify_sae(ck, x)
    assert direct.lam == pytest.approx(L1 / 2) == via.lam
    assert direct.sae_codes.loss == pytest.approx(via.sae_codes.loss, rel=1e-12)
    assert direct.exact_codes.loss == pytest.approx(via.exact_codes.loss, rel=1e-12)
    with quiet(), pytest.raises(ValueError, match="disagrees"):
        certify_sae(sae, x, L1)                     # SAELens' l1_coefficient is 2λ, not λ
    topk = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    with pytest.raises(CheckpointError, match="TopK SAE"):
        certify_sae(topk, x, 0.1)
