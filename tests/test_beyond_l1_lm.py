"""tools/beyond_l1_lm.py: the smoke configuration trains SAELens TopK, BatchTopK and JumpReLU SAEs
on an activation cache, saves them in SAELens' format and measures them; the committed Chapter 9
MiniLM SAEs are complete, within the size budget, and each reads back as the architecture its
results say."""

import json
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("sae_lens")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import beyond_l1_lm  # noqa: E402

from companion.beyond_l1 import load_sparse_sae  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDY = ROOT / "tools" / "beyond_l1_lm"
MEASURED = ("l0", "fvu", "refit_relative_gap", "refit_shrinkage", "stat_noise_median",
            "moves_improvable", "matched_lambda", "dense_30", "antipodal_05")


def _check(out, results):
    for entry, trained in zip(results["saes"], results["trained"]):
        assert entry["name"] == trained["name"]
        ck = load_sparse_sae(out / entry["name"])
        assert ck.architecture == entry["architecture"] == trained["architecture"]
        assert ck.sae.d_sae == results["config"]["width"]
        if ck.architecture == "jumprelu":
            assert ck.eps == pytest.approx(trained["param"] / 2)
        else:
            assert ck.k == trained["param"]
        for key in MEASURED:
            assert np.isfinite(entry[key]), key
        assert 0 <= entry["refit_relative_gap"] < 1 and 0 <= entry["moves_improvable"] <= 1


def test_smoke_run_trains_saves_and_measures(tmp_path):
    rng = np.random.default_rng(0)
    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / "train.npy", rng.normal(size=(3000, 12)).astype(np.float32))
    np.save(cache / "test.npy", rng.normal(size=(600, 12)).astype(np.float32))
    out = tmp_path / "out"
    beyond_l1_lm.main(["--smoke", "--out", str(out), "--cache", str(cache), "--jobs", "2"])
    results = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in results["saes"]] == [
        "topk_K32_seed0", "batchtopk_K32_seed0", "jumprelu_c2_seed0", "jumprelu_c0.5_seed0"]
    _check(out, results)


def test_missing_cache_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="tools/lm_study.py"):
        beyond_l1_lm.main(["--smoke", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "none")])


@pytest.mark.skipif(not (STUDY / "results.json").exists(), reason="no committed Chapter 9 MiniLM SAEs")
def test_committed_study_is_complete_small_and_readable():
    results = json.loads((STUDY / "results.json").read_text())
    a = beyond_l1_lm.parse([])
    names = [beyond_l1_lm.name(*j, a.width) for j in beyond_l1_lm.jobs(a)]
    sparse = [s for s in results["saes"] if s["architecture"] != "l1"]
    assert [s["name"] for s in sparse] == names == [t["name"] for t in results["trained"]]
    assert sum(s["architecture"] == "l1" for s in results["saes"]) == 3
    size = sum(f.stat().st_size for f in STUDY.rglob("*") if f.is_file())
    assert size < 30e6
    results["saes"] = sparse
    _check(STUDY, results)
