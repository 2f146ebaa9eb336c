"""``python -m companion certify`` (companion.cli, how-to page)."""

import json
import os
import subprocess
import sys
import textwrap

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
    assert "verdict" in out and "dictionary stationary to rounding at exact codes" in out
    assert "sampling noise at n = 200 rows" in out and "what to do next" in out
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
    assert "(50 of 200 rows, drawn at random with --seed 0)" in out and "amortisation gap" not in out


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
    assert code == 2 and f"NaN or infinite entries: first in row 1 of {tmp_path / 'nan.npy'}" in err


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


def test_json_holds_the_report_contents(trained, capsys):
    out_json = trained / "full.json"
    code, out, err = run(["certify", str(trained / "sae"), str(trained / "acts.npy"), "--json", str(out_json),
                          "--no-progress"], capsys)
    assert code == 0, err
    rep = json.loads(out_json.read_text())
    assert rep["sae_codes"]["codes"] == "given" and rep["exact_codes"]["codes"] == "exact"
    for part in ("sae_codes", "exact_codes"):
        r = rep[part]
        for key in ("l0", "fvu", "t1_violation_lam", "huber_bound", "huber_gap", "bias_stationarity", "verdict"):
            assert key in r, (part, key)
        assert r["huber_gap"] >= 0 and 0 <= r["fvu"] <= 1
    assert "SAELens training loss / 2" in rep["loss_convention"]
    assert "optim" not in rep["exact_codes"]["verdict"]
    for words in ("SAELens' training loss divided by 2", "FVU = sum_n", "in units of lambda", "L0",
                  "gap to T4 Huber bound", "would lower the loss by at least"):
        assert words in out, words


def test_max_rows_is_a_seeded_random_sample(trained, capsys):
    losses = {}
    for seed in (0, 0, 1):
        out_json = trained / f"s{seed}.json"
        code, out, err = run(["certify", str(trained / "sae"), str(trained / "acts.npy"), "--max-rows", "40",
                              "--seed", str(seed), "--no-exact", "--no-progress", "--json", str(out_json)], capsys)
        assert code == 0, err
        rep = json.loads(out_json.read_text())
        assert rep["n_samples"] == 40 and rep["n_rows_in_file"] == 200 and rep["row_sample"]["seed"] == seed
        losses.setdefault(seed, []).append(rep["sae_codes"]["loss"])
    assert losses[0][0] == losses[0][1] != losses[1][0]


def one_line_error(code, out, err, match):
    assert code == 2 and out == "", (code, out, err)
    assert err.count("\n") == 1 and match in err, err


def test_bad_device_json_dir_and_non_regular_files_exit_2(trained, tmp_path, capsys):
    sae, acts = str(trained / "sae"), str(trained / "acts.npy")
    one_line_error(*run(["certify", sae, acts, "--device", "banana"], capsys), "--device 'banana'")
    if not torch.cuda.is_available():
        one_line_error(*run(["certify", sae, acts, "--device", "cuda"], capsys), "not usable with this torch")
    one_line_error(*run(["certify", sae, acts, "--json", str(tmp_path / "no" / "r.json")], capsys),
                   "does not exist")
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    one_line_error(*run(["certify", sae, str(fifo)], capsys), "not a regular file")
    one_line_error(*run(["certify", sae, "/dev/zero"], capsys), "not a regular file")
    one_line_error(*run(["certify", sae, acts, "--lam", "0.05", "--activation-scale", "2"], capsys),
                   "activation_scale")


def test_corrupt_checkpoint_files_exit_2(trained, tmp_path, capsys):
    import shutil
    acts = str(trained / "acts.npy")
    bad = tmp_path / "bad"
    shutil.copytree(trained / "sae", bad)
    (bad / "sae_weights.safetensors").write_bytes(b"\x00\x01 not safetensors")
    one_line_error(*run(["certify", str(bad), acts], capsys), "could not read")
    shutil.copy(trained / "sae" / "sae_weights.safetensors", bad / "sae_weights.safetensors")
    cfg = json.loads((bad / "cfg.json").read_text())
    cfg["d_in"] = "5x"
    (bad / "cfg.json").write_text(json.dumps(cfg))
    one_line_error(*run(["certify", str(bad), acts], capsys), "d_in must be an integer")


PEAK = textwrap.dedent("""
    import resource, sys
    from companion.cli import main
    code = main(sys.argv[1:])
    print(code, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_peak_memory_does_not_grow_with_the_number_of_rows(tmp_path):
    """Issue 13.1: rows are streamed, so peak RSS at 40k rows ≈ peak RSS at 4k rows.

    One (n, d_sae) float64 code matrix at 40k rows would be 40000 * 2048 * 8 B = 655 MB; the
    memory-mapped file itself is 5 MB.
    """
    d_in, d_sae = 32, 2048
    g = torch.Generator().manual_seed(0)
    sae = VanillaSAE(d_in, d_sae, dtype=torch.float64)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g, dtype=torch.float64))
        sae.W_enc.copy_(sae.W_dec.T / d_in)
    save_sae(sae, tmp_path / "wide", lam=0.1)
    peaks = {}
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    for n in (4000, 40000):
        np.save(tmp_path / f"a{n}.npy", np.random.default_rng(n).standard_normal((n, d_in)).astype(np.float32))
        done = subprocess.run([sys.executable, "-c", PEAK, "certify", str(tmp_path / "wide"),
                               str(tmp_path / f"a{n}.npy"), "--no-exact", "--chunk-size", "256",
                               "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        code, kib = done.stdout.split()[-2:]
        assert code == "0"
        peaks[n] = int(kib) / 1024
    print(f"peak RSS: {peaks[4000]:.0f} MiB at 4000 rows, {peaks[40000]:.0f} MiB at 40000 rows")
    assert peaks[40000] - peaks[4000] < 40, peaks


def test_pt_activations_alpha_and_statistics_in_json(trained, tmp_path, capsys):
    torch.save(torch.zeros(4, 5), tmp_path / "acts.pt")
    code, _, err = run(["certify", str(trained / "sae"), str(tmp_path / "acts.pt"), "--no-progress"], capsys)
    assert code == 2 and "is a torch.save file" in err and "numpy.save" in err
    code, _, err = run(["certify", str(trained / "sae"), str(trained / "acts.npy"), "--alpha", "2"], capsys)
    assert code == 2 and "--alpha must lie in (0, 1)" in err
    out_json = tmp_path / "r.json"
    code, out, err = run(["certify", str(trained / "sae"), str(trained / "acts.npy"), "--no-progress",
                          "--json", str(out_json)], capsys)
    assert code == 0, err
    rep = json.loads(out_json.read_text())
    assert rep["world_size"] == 1 and rep["verdict"] == rep["statistics"]["verdict"]
    assert {s["topic"] for s in rep["next_steps"]} >= {"encoder", "dictionary", "width"}
    assert rep["statistics"]["n_samples"] == 200 and len(rep["statistics"]["atom_t2_se"]) == 8


def test_progress_is_on_by_default_and_names_the_stages(trained, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    code, _, err = run(["certify", str(trained / "sae"), str(trained / "acts.npy")], capsys)
    assert code == 0
    assert "certify_sae: read rows, SAE codes, exact codes" in err and "certify_sae: new-atom searches" in err


def test_a_topk_checkpoint_gets_chapter_9s_certificates(tmp_path, capsys):
    """The committed SAELens TopK checkpoint of tools/beyond_l1_saes: the CLI prints the
    support-refit gap, the local moves and the matched-λ view; --lam is refused for it."""
    import pathlib

    ck = pathlib.Path(__file__).resolve().parents[1] / "tools" / "beyond_l1_saes" / "topk_2_seed0"
    acts = tmp_path / "acts.npy"
    np.save(acts, np.random.default_rng(0).normal(size=(300, 4)))
    assert main(["certify", str(ck), str(acts), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "topk; d_in=4, d_sae=4; k = 2" in out and "300 rows" in out
    for words in ("support-refit gap", "local moves (k=2)", "plain-centroid stationarity", "matched L1"):
        assert words in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["architecture"] == "topk" and report["k"] == 2 and report["n_samples"] == 300
    assert main(["certify", str(ck), str(acts), "--lam", "0.1"]) == 2
    assert "--lam applies to L1 SAEs" in capsys.readouterr().err
