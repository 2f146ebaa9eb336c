"""tools/lm_study.py: the smoke configuration runs end to end, and --resume keeps what an
earlier run of the same command finished and runs only the rest."""

import json
import pathlib
import sys

import pytest

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
