"""``python -m companion certify`` (companion.cli, how-to page)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from companion.cli import main
from companion.interop import save_sae
from companion.sae import VanillaSAE, train_sae


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small SAE trained on sparse data, saved in the SAELens layout, plus its activations."""
    g = torch.Generator().manual_seed(0)
    F = torch.randn(6, 5, generator=g, dtype=torch.float64)
    F = F / F.norm(dim=1, keepdim=True)
    codes = torch.rand(200, 6, generator=g, dtype=torch.float64) * (torch.rand(200, 6, generator=g) < 0.3)
    X = codes @ F + 0.3
    res = train_sae(X, 8, 0.05, steps=300, progress=False)
    root = tmp_path_factory.mktemp("cli")
    save_sae(res.sae, root / "sae", lam=0.05)
    np.save(root / "acts.npy", X.numpy())
    return root


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_certify_prints_a_report_and_writes_json(trained, capsys):
    out_json = trained / "report.json"
    code, out, err = run(["certify", str(trained / "sae"), str(trained / "acts.npy"), "--lam", "0.05",
                          "--json", str(out_json), "--chunk-size", "64", "--no-progress"], capsys)
    assert code == 0, err
    assert "lambda       0.05  (from --lam, agrees with the checkpoint)" in out
    assert "SAE codes" in out and "exact codes" in out and "amortisation gap" in out
    assert "verdict" in out and "dictionary stationary at exact codes" in out
    rep = json.loads(out_json.read_text())
    assert rep["lam"] == 0.05 and rep["n_samples"] == 200 and rep["d_sae"] == 8
    assert rep["exact_codes"]["t1_violation"] <= 1e-8
    assert rep["amortisation_gap"] >= -1e-12
    assert rep["amortisation_gap"] == pytest.approx(rep["sae_codes"]["loss"] - rep["exact_codes"]["loss"])


def test_lam_defaults_to_the_checkpoint_and_max_rows_no_exact(trained, capsys):
    code, out, err = run(["certify", str(trained / "sae"), str(trained / "acts.npy"), "--max-rows", "50",
                          "--no-exact", "--no-progress", "--dtype", "float32"], capsys)
    assert code == 0, err
    assert "from the checkpoint: cfg.json companion_lam" in out
    assert "(50 rows)" in out and "amortisation gap" not in out


@pytest.mark.parametrize("extra, match", [
    (["--lam", "0"], "lam must be a finite number > 0, got 0.0"),
    (["--lam", "-1"], "lam must be a finite number > 0"),
    (["--lam", "0.2"], "disagrees with the checkpoint's λ=0.05"),
    (["--chunk-size", "0"], "--chunk-size must be >= 1, got 0"),
])
def test_bad_lam_and_options_exit_2(trained, capsys, extra, match):
    code, out, err = run(["certify", str(trained / "sae"), str(trained / "acts.npy"), "--no-progress", *extra],
                         capsys)
    assert code == 2
    assert match in err and out == ""


def test_override_lam(trained, capsys):
    code, out, err = run(["certify", str(trained / "sae"), str(trained / "acts.npy"), "--lam", "0.2",
                          "--override-lam", "--no-exact", "--no-progress"], capsys)
    assert code == 0, err
    assert "overriding the checkpoint's 0.05" in out


def test_bad_files_exit_2(trained, tmp_path, capsys):
    acts = str(trained / "acts.npy")
    code, _, err = run(["certify", str(tmp_path / "missing"), acts], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run(["certify", str(trained / "sae"), str(tmp_path / "missing.npy")], capsys)
    assert code == 2 and "activations file" in err and "does not exist" in err
    np.save(tmp_path / "wide.npy", np.zeros((4, 7)))
    code, _, err = run(["certify", str(trained / "sae"), str(tmp_path / "wide.npy")], capsys)
    assert code == 2 and "7 columns but the SAE has d_in=5" in err
    np.save(tmp_path / "flat.npy", np.zeros(5))
    code, _, err = run(["certify", str(trained / "sae"), str(tmp_path / "flat.npy")], capsys)
    assert code == 2 and "must be 2-dimensional" in err
    (tmp_path / "junk.npy").write_text("not an array")
    code, _, err = run(["certify", str(trained / "sae"), str(tmp_path / "junk.npy")], capsys)
    assert code == 2 and "could not read" in err
    bad = np.zeros((3, 5))
    bad[1, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    code, _, err = run(["certify", str(trained / "sae"), str(tmp_path / "nan.npy")], capsys)
    assert code == 2 and "1 NaN or infinite entries" in err


def test_dictionary_learning_checkpoint_needs_lam(trained, tmp_path, capsys):
    sae = VanillaSAE(5, 3, dtype=torch.float64)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(3, 5, dtype=torch.float64))
        sae.W_enc.copy_(sae.W_dec.T)
    torch.save({"encoder.weight": sae.W_enc.detach().T.clone(), "encoder.bias": sae.b_enc.detach().clone(),
                "decoder.weight": sae.W_dec.detach().T.clone(), "bias": sae.b_dec.detach().clone()},
               tmp_path / "ae.pt")
    code, _, err = run(["certify", str(tmp_path / "ae.pt"), str(trained / "acts.npy"), "--no-progress"], capsys)
    assert code == 2 and "lam is required" in err
    code, out, err = run(["certify", str(tmp_path / "ae.pt"), str(trained / "acts.npy"), "--lam", "0.1",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "dictionary_learning" in out


def test_module_entry_point_and_usage_errors(trained):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    ok = subprocess.run([sys.executable, "-m", "companion", "certify", str(trained / "sae"),
                         str(trained / "acts.npy"), "--no-exact"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "verdict" in ok.stdout
    usage = subprocess.run([sys.executable, "-m", "companion"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage:" in usage.stderr
