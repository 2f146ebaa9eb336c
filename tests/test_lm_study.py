"""tools/lm_study.py: the smoke configuration runs end to end, and --resume keeps what an
earlier run of the same command finished and runs only the rest. tools/ch08_saes.py: its smoke
configuration writes checkpoints that companion.load_sae and SAELens read, and the committed
Chapter 8 SAEs are complete, small, on their plateau and readable by both."""

import json
import pathlib
import sys

import pytest
import torch

pytest.importorskip("sae_lens")
pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import lm_study  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_study") / "smoke.json"
    assert lm_study.main(["--smoke", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


def test_smoke_run_writes_both_trainers_with_the_ladder(smoke):
    _, summary = smoke
    assert summary["complete"] and summary["command"].endswith(f"--out {smoke[0]}")
    assert [r["trainer"] for r in summary["results"]] == ["companion", "saelens"]
    for r in summary["results"]:
        assert r["sae_loss"] >= r["exact_loss"] >= r["huber_bound"]


def test_resume_runs_only_the_missing_saes(smoke, tmp_path):
    out, summary = smoke
    cut = dict(summary, complete=False, results=summary["results"][:1])
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(cut))
    assert lm_study.main(["--smoke", "--out", str(path), "--resume"]) == 0
    resumed = json.loads(path.read_text())
    assert resumed["complete"] and "--resume" not in resumed["command"]
    assert resumed["results"][0] == summary["results"][0]          # kept, not recomputed
    assert [r["trainer"] for r in resumed["results"]] == ["companion", "saelens"]
    assert resumed["results"][1]["sae_loss"] == pytest.approx(summary["results"][1]["sae_loss"])


def test_resume_refuses_another_configuration(smoke, tmp_path):
    out, _ = smoke
    with pytest.raises(SystemExit, match="another configuration"):
        lm_study.main(["--smoke", "--lr", "0.01", "--out", str(out), "--resume"])


# tools/ch08_saes.py: Chapter 8's SAEs, trained once and committed in tools/ch08_saes/

import ch08_saes  # noqa: E402

import companion  # noqa: E402
from companion.interop import CheckpointWarning, checkpoint_lam  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CH08 = ROOT / "tools" / "ch08_saes"


def _load(folder):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        return companion.load_sae(folder, dtype=torch.float64)


def _saelens_weights(folder):
    import warnings

    from sae_lens import SAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sae = SAE.load_from_disk(str(folder))
    return {k: v.detach().double() for k, v in sae.state_dict().items()}


def test_ch08_saes_smoke_writes_loadable_checkpoints(tmp_path):
    out = tmp_path / "saes"
    assert ch08_saes.main(["--smoke", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["trainer"] for e in manifest["saes"]] == ["companion", "saelens"]
    for entry in manifest["saes"]:
        folder = out / entry["folder"]
        ckpt = _load(folder)
        assert checkpoint_lam(ckpt, entry["lam"]) == entry["lam"]
        assert ckpt.sae.d_sae == entry["K"]
        history = json.loads((folder / "loss_history.json").read_text())
        assert len(history) == entry["steps"]
    w = _saelens_weights(out / manifest["saes"][1]["folder"])       # SAELens reads its own files
    assert torch.equal(w["W_dec"], _load(out / manifest["saes"][1]["folder"]).sae.W_dec.detach())


@pytest.mark.skipif(not (CH08 / "manifest.json").exists(), reason="no committed Chapter 8 SAEs")
def test_committed_ch08_saes_load_small_and_complete():
    manifest = json.loads((CH08 / "manifest.json").read_text())
    keys = [(e["trainer"], e["lam"], e["K"], e["seed"]) for e in manifest["saes"]]
    assert keys == ch08_saes.runs()
    size = sum(f.stat().st_size for f in CH08.rglob("*") if f.is_file())
    assert size < 20e6
    for entry in manifest["saes"]:
        folder = CH08 / entry["folder"]
        ckpt = _load(folder)
        assert checkpoint_lam(ckpt, entry["lam"]) == entry["lam"]
        assert (ckpt.sae.d_in, ckpt.sae.d_sae) == (384, entry["K"])
        assert len(json.loads((folder / "loss_history.json").read_text())) == entry["steps"]
        assert companion.plateau_fall(json.loads((folder / "loss_history.json").read_text())) < 0.01
        if entry["trainer"] == "saelens":
            assert torch.equal(_saelens_weights(folder)["W_dec"], ckpt.sae.W_dec.detach())
