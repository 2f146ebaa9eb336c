"""tools/lm_study.py: the smoke configuration writes SAEs that companion.load_sae and SAELens read,
with their curves and a stationary point descended from the headline SAELens dictionary; and the
committed Chapter 8 SAEs are complete, within the repository's size budget and readable by both."""

import json
import pathlib
import sys
import warnings

import pytest
import torch

pytest.importorskip("sae_lens")
pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import lm_study  # noqa: E402

import companion  # noqa: E402
from companion.interop import CheckpointWarning, checkpoint_lam  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDY = ROOT / "tools" / "lm_study"


def _load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        return companion.load_sae(folder, dtype=torch.float64)


def _saelens_W_dec(folder):
    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAE.load_from_disk(str(folder))
    return sae.state_dict()["W_dec"].detach().double()


def _check_study(out, manifest, steps):
    for entry in manifest["saes"]:
        folder = out / entry["name"]
        ckpt = _load(folder)
        assert checkpoint_lam(ckpt, manifest["config"]["lam"]) == manifest["config"]["lam"]
        assert ckpt.sae.d_sae == entry["K"]
        curves = json.loads((folder / "curves.json").read_text())
        assert len(curves["minibatch"]) == steps
        assert curves["heldout_steps"][0] == 0 and curves["heldout_steps"][-1] == steps
        # SAELens reads the files of both trainers, to the same weights
        assert torch.equal(_saelens_W_dec(folder), ckpt.sae.W_dec.detach())
    for point in manifest["stationary"]:
        from safetensors.torch import load_file

        D = load_file(out / point["name"] / "stationary.safetensors")["D"]
        assert torch.allclose(D.norm(dim=1), torch.ones(len(D)), atol=1e-5)


def test_smoke_run_trains_saves_and_descends(tmp_path):
    out = tmp_path / "study"
    lm_study.main(["--smoke", "--out", str(out), "--cache", str(tmp_path / "cache"), "--jobs", "2"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["trainer"], e["K"], e["seed"]) for e in manifest["saes"]] == [
        ("saelens", 16, 0), ("saelens", 32, 0), ("companion", 16, 0)]
    assert [p["name"] for p in manifest["stationary"]] == ["saelens_K16_seed0"]
    assert manifest["data"]["train"]["tokens"] > manifest["data"]["test"]["tokens"] > 0
    _check_study(out, manifest, steps=40)


@pytest.mark.skipif(not (STUDY / "manifest.json").exists(), reason="no committed Chapter 8 SAEs")
def test_committed_study_is_complete_small_and_readable():
    manifest = json.loads((STUDY / "manifest.json").read_text())
    a = lm_study.parse([])
    assert [(e["trainer"], e["K"], e["seed"]) for e in manifest["saes"]] == lm_study.jobs(a)
    assert manifest["data"]["train"]["tokens"] >= 3e5 and manifest["data"]["test"]["tokens"] >= 2e4
    size = sum(f.stat().st_size for f in STUDY.rglob("*") if f.is_file())
    assert size < 60e6
    _check_study(STUDY, manifest, steps=manifest["config"]["steps"])
