"""Chapters run where readers run them: an environment built the way Colab's set-up cell builds it.

In Colab the set-up cell installs ``companion`` from the clone with the chapter's extras only
(``tools/notebooks.py``'s ``CHAPTER_EXTRAS``), beside Colab's own torch and Jupyter; none of the
``book`` or ``test`` extras (so no ``myst_nb``, no ``jupytext``). This test builds such an
environment in a fresh virtual environment — torch pinned first, then the package from the
repository with the chapter's extras, then the kernel Colab provides (``ipykernel``,
``nbclient``) — executes the *stored* ``.ipynb`` there with nbclient, as Colab opens it, and
compares each code cell's text output with the stored one.

It takes minutes (installing SAELens for the how-to), so it is marked ``colab`` and left out
of ``make test``; ``.ci/run`` runs it (``pytest -m colab``).
"""

import json
import os
import pathlib
import subprocess
import sys
import venv

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402
import notebooks  # noqa: E402

pytestmark = pytest.mark.colab
CHAPTERS = ["ch01_sae_to_joint", "howto_certify"]
_EXECUTE = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
               resources={"metadata": {"path": sys.argv[3]}}).execute()
nbformat.write(nb, sys.argv[2])
"""


def _pip(python: pathlib.Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-c", str(ROOT / "constraints.txt"), *args], check=True, cwd=ROOT)


@pytest.fixture(scope="module")
def colab_python(tmp_path_factory):
    """A fresh venv: pinned torch, then the package with the union of the tested chapters'
    extras (never ``book``/``test``), then the Jupyter kernel Colab has."""
    folder = tmp_path_factory.mktemp("colab") / "venv"
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    _pip(python, "torch==2.13.0")
    extras = sorted({e for ch in CHAPTERS for e in notebooks.CHAPTER_EXTRAS.get(ch, "").split(",") if e})
    _pip(python, f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT))
    _pip(python, "ipykernel", "nbclient")
    missing = subprocess.run([str(python), "-c", "import myst_nb"], capture_output=True)
    assert missing.returncode != 0, "the Colab-like venv has myst_nb; it must be built without it"
    return python


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_stored_notebook_runs_with_the_set_up_cells_install_only(colab_python, chapter, tmp_path):
    stored_path = ROOT / "book" / f"{chapter}.ipynb"
    out = tmp_path / stored_path.name
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONHASHSEED="0", COMPANION_DEVICE="cpu",
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(colab_python), "-c", _EXECUTE, str(stored_path), str(out),
                           str(ROOT / "book")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = nbformat.read(stored_path, as_version=4)
    new = notebooks._normalise(nbformat.read(out, as_version=4))   # streams merged as when stored
    diffs = gpu_check.compare(stored, new, stored_path.name, "Colab-like run")
    assert not diffs, "\n".join(map(str, diffs))
    assert json.loads(out.read_text())["cells"], "empty notebook"
