"""Notebook tooling for the book: pairing, deterministic execution and consistency checks.

The MyST-markdown file ``book/<chapter>.md`` is the source a person edits; the paired
``book/<chapter>.ipynb`` holds the same cells plus the stored outputs that the book renders,
nbval checks, and Colab opens.

    python tools/notebooks.py execute [CHAPTER ...]   # md -> ipynb, run every cell, store outputs
    python tools/notebooks.py check                   # pairing, outputs, set-up cell (exit 1 on problems)

Execution is deterministic: cell ids are derived from cell positions, the ``execution``
timing metadata is dropped, ``TQDM_DISABLE=1`` and ``PYTHONHASHSEED=0`` are set, and each
chapter seeds itself in its set-up cell, so a re-run leaves byte-identical ``.ipynb`` files.
"""

from __future__ import annotations

import os
import pathlib
import sys

import jupytext
import nbformat
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CELL_TIMEOUT_S = 900

SETUP_CELL = """\
# Set-up (the same in every chapter). In Colab: install `companion`, keeping
# Colab's torch. Everywhere: seed all random streams and pick the device.
import sys

if "google.colab" in sys.modules:
    %pip install -q "sae-optimality-companion{extras} @ git+{repo_url}"

import companion

device = companion.setup(seed=0)"""


def repository_url() -> str:
    """The repository URL, kept in one place: ``repository.url`` in ``_config.yml``."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return config["repository"]["url"]


# Chapters whose Colab install needs an optional extra of the package (pyproject.toml).
CHAPTER_EXTRAS = {"ch08_language_model": "lm"}


def setup_cell_source(chapter: str = "") -> str:
    """The canonical first code cell of ``chapter`` (its stem): the same everywhere but for the extras."""
    extra = CHAPTER_EXTRAS.get(chapter)
    return SETUP_CELL.format(repo_url=repository_url(), extras=f"[{extra}]" if extra else "")


def paired_chapters() -> list[pathlib.Path]:
    """Markdown files of ``book/`` that jupytext pairs with a notebook."""
    chapters = []
    for md in sorted(BOOK.glob("*.md")):
        head = md.read_text().split("\n---", 1)[0]
        if md.read_text().startswith("---") and "jupytext:" in head:
            chapters.append(md)
    return chapters


def _merge_streams(outputs: list) -> list:
    """Join consecutive outputs of the same stream.

    How a cell's printing is split into stream messages depends on timing, so without this
    a re-run could store the same text in a different number of pieces.
    """
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and prev is not None
                and prev.get("output_type") == "stream" and prev.get("name") == out.get("name")):
            prev["text"] += out["text"]
        else:
            merged.append(out)
    return merged


def _normalise(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Position-derived cell ids and no timing metadata, so that re-runs are byte-identical."""
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = _merge_streams(cell.get("outputs", []))
            for out in cell.outputs:
                out.get("metadata", {}).pop("execution", None)
    nb.metadata.pop("widgets", None)
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nb


def _write(nb: nbformat.NotebookNode, path: pathlib.Path) -> None:
    text = nbformat.writes(nb, version=4)
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text)


def execute(md: pathlib.Path) -> None:
    """Rebuild ``md``'s notebook from the markdown and execute it in ``book/``."""
    from nbclient import NotebookClient

    nb = jupytext.read(md)
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,md:myst"
    nb = _normalise(nb)
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["PYTHONHASHSEED"] = "0"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(md.parent)}},
    )
    client.execute()
    nb = _normalise(nb)
    _write(nb, md.with_suffix(".ipynb"))


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def check() -> list[str]:
    """Return a list of problems: unpaired or out-of-sync notebooks, unexecuted cells, wrong set-up cell."""
    problems = []
    for md in paired_chapters():
        setup = setup_cell_source(md.stem)
        ipynb = md.with_suffix(".ipynb")
        if not ipynb.exists():
            problems.append(f"{md.name}: no paired {ipynb.name}; run `make execute`")
            continue
        text_nb = jupytext.read(md)
        stored = nbformat.read(ipynb, as_version=4)
        if _cells(text_nb) != _cells(stored):
            problems.append(f"{ipynb.name}: cells differ from {md.name}; run `make execute`")
        code = [c for c in stored.cells if c.cell_type == "code"]
        unrun = [i for i, c in enumerate(code) if c.get("execution_count") is None]
        if unrun:
            problems.append(f"{ipynb.name}: code cells {unrun} have no stored execution")
        if not code or code[0].source.strip() != setup.strip():
            problems.append(f"{ipynb.name}: first code cell is not the standard set-up cell")
        elif "hide-input" not in code[0].metadata.get("tags", []):
            problems.append(f"{ipynb.name}: the set-up cell lacks the hide-input tag")
        if not any("assert" in c.source for c in code):
            problems.append(f"{ipynb.name}: no assert ties a prediction to a measurement")
        for c in code:
            for out in c.get("outputs", []):
                if out.get("output_type") == "error":
                    problems.append(f"{ipynb.name}: a stored output is an error")
                if out.get("name") == "stderr":
                    problems.append(f"{ipynb.name}: stored stderr output: {out.get('text', '')[:80]!r}")
    stray = sorted(p.name for p in BOOK.glob("*.ipynb") if not p.with_suffix(".md").exists())
    problems += [f"{name}: notebook without a paired .md" for name in stray]
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"execute", "check"}:
        print(__doc__)
        return 2
    if argv[0] == "check":
        problems = check()
        for p in problems:
            print(p)
        return 1 if problems else 0
    wanted = set(argv[1:])
    for md in paired_chapters():
        if wanted and md.stem not in wanted and md.name not in wanted:
            continue
        print(f"executing {md.relative_to(ROOT)}", flush=True)
        execute(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
