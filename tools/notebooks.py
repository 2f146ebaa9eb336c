"""Notebook tooling for the book: pairing, deterministic execution and consistency checks.

The MyST-markdown file ``book/<chapter>.md`` is the source a person edits; the paired
``book/<chapter>.ipynb`` holds the same cells plus the stored outputs that the book renders,
nbval checks, and Colab opens.

    python tools/notebooks.py execute [CHAPTER ...]   # md -> ipynb, run every cell, store outputs
    python tools/notebooks.py check                   # pairing, outputs, set-up cell (exit 1 on problems)
    python tools/notebooks.py set-url [URL]           # write repository.url (or URL) into every set-up cell

Execution is deterministic: cell ids are derived from cell positions, the ``execution``
timing metadata is dropped, ``TQDM_DISABLE=1`` and ``PYTHONHASHSEED=0`` are set, and each
chapter seeds itself in its set-up cell, so a re-run leaves byte-identical ``.ipynb`` files.

Each execution also records the chapter's wall time and cell counts in
``book/execution_stats.csv`` (one row per chapter, sorted, times rounded to whole seconds,
so a re-run on the same machine changes only the times), which the page
``book/execution.md`` renders with Sphinx's ``csv-table`` at build time.

The repository URL lives in ``_config.yml`` (``repository.url``) only. ``set-url`` rewrites
the ``%pip install`` line of every chapter's set-up cell (in the ``.md`` and in the stored
``.ipynb``, whose outputs do not depend on it) and the install lines of ``README.md`` and
``book/intro.md`` from it; ``check`` refuses any place that disagrees.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import pathlib
import re
import sys
import time

import jupytext
import nbformat
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CELL_TIMEOUT_S = 900
STATS = BOOK / "execution_stats.csv"
STATS_HEADER = ["Chapter", "Cells", "Code cells", "Run time (s)", "CPU cores", "Device"]
# Files outside the chapters whose install line names the repository URL.
URL_FILES = ("README.md", "book/intro.md")
# The URL part of `... @ git+URL"`, in an install line of README or the intro.
_GIT_URL = re.compile(r'(sae-optimality-companion(?:\[[\w,]+\])? @ git\+)([^"\s]+)(")')

SETUP_CELL = """\
# Set-up (the same in every chapter). In Colab: fetch the repository (some chapters read
# results that its tools/ scripts wrote), install `companion` from it keeping Colab's torch,
# and work in its book/ folder. Everywhere: seed all random streams and pick the device.
import sys

if "google.colab" in sys.modules:
    !test -d /content/optimality-companion || git clone -q --depth 1 {repo_url} /content/optimality-companion
    %pip install -q "/content/optimality-companion{extras}"
    %cd /content/optimality-companion/book

import companion

device = companion.setup(seed=0)"""
# The URL of the set-up cell's clone line.
_CLONE_URL = re.compile(r"(git clone -q --depth 1 )(\S+)( /content/)")


def repository_url(root: pathlib.Path = ROOT) -> str:
    """The repository URL, kept in one place: ``repository.url`` in ``_config.yml``."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    return config["repository"]["url"]


# Chapters whose Colab install needs an optional extra of the package (pyproject.toml).
CHAPTER_EXTRAS = {"ch08_language_model": "lm,saelens", "howto_certify": "saelens"}


def setup_cell_source(chapter: str = "", url: str | None = None) -> str:
    """The canonical first code cell of ``chapter`` (its stem): the same everywhere but for the extras."""
    extra = CHAPTER_EXTRAS.get(chapter)
    return SETUP_CELL.format(repo_url=url or repository_url(), extras=f"[{extra}]" if extra else "")


def paired_chapters(book: pathlib.Path = BOOK) -> list[pathlib.Path]:
    """Markdown files of ``book/`` that jupytext pairs with a notebook."""
    chapters = []
    for md in sorted(book.glob("*.md")):
        head = md.read_text().split("\n---", 1)[0]
        if md.read_text().startswith("---") and "jupytext:" in head:
            chapters.append(md)
    return chapters


def select_chapters(names: list[str], book: pathlib.Path = BOOK) -> tuple[list[pathlib.Path], list[str]]:
    """The paired chapters named in ``names`` (stems or file names; all when empty), and the
    names that match no chapter."""
    chapters = [md for md in paired_chapters(book) if not names or md.stem in names or md.name in names]
    unknown = sorted(set(names) - {md.stem for md in chapters} - {md.name for md in chapters})
    return chapters, unknown


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


def run_notebook(md: pathlib.Path) -> nbformat.NotebookNode:
    """Build the notebook from the markdown ``md`` and execute it in ``md``'s folder; nothing is written."""
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
    return _normalise(nb)


def execute(md: pathlib.Path) -> dict:
    """Rebuild ``md``'s notebook from the markdown, execute it, store it and record its statistics.

    Returns the statistics row (see :data:`STATS_HEADER`) written to ``book/execution_stats.csv``.
    """
    start = time.perf_counter()
    nb = run_notebook(md)
    seconds = time.perf_counter() - start
    _write(nb, md.with_suffix(".ipynb"))
    row = stats_row(md.stem, nb, seconds)
    record_stats(row)
    return row


def _device() -> str:
    """The device the chapters pick (``COMPANION_DEVICE`` respected); imported here only, since
    checking and set-url need no torch."""
    from companion import pick_device

    return pick_device().type


def stats_row(chapter: str, nb: nbformat.NotebookNode, seconds: float) -> dict:
    """One row of the statistics: counts from ``nb``, the wall time rounded to whole seconds."""
    return {
        "Chapter": f"{{doc}}`{chapter}`",
        "Cells": str(len(nb.cells)),
        "Code cells": str(sum(c.cell_type == "code" for c in nb.cells)),
        "Run time (s)": str(max(1, round(seconds))),
        "CPU cores": str(len(os.sched_getaffinity(0))),
        "Device": _device(),
    }


def _chapter_of(row: dict) -> str:
    return row["Chapter"].removeprefix("{doc}`").removesuffix("`")


def _parse_stats(text: str) -> dict[str, dict]:
    return {_chapter_of(r): r for r in csv.DictReader(io.StringIO(text))}


def read_stats(path: pathlib.Path = STATS) -> dict[str, dict]:
    """The recorded rows by chapter stem (empty when no file)."""
    return _parse_stats(path.read_text()) if path.exists() else {}


def _format_stats(rows: dict[str, dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=STATS_HEADER, lineterminator="\n")
    writer.writeheader()
    for chapter in sorted(rows):
        writer.writerow(rows[chapter])
    return out.getvalue()


def record_stats(row: dict, path: pathlib.Path = STATS, book: pathlib.Path = BOOK) -> None:
    """Put ``row`` into the statistics file, replacing that chapter's row and dropping rows of
    chapters that no longer exist. Rows are sorted by chapter, so the file changes only where
    a number does. The file is locked while it is rewritten (chapters may execute in parallel).
    """
    existing = {md.stem for md in paired_chapters(book)}
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        rows = _parse_stats(text)
        rows[_chapter_of(row)] = row
        rows = {c: r for c, r in rows.items() if c in existing}
        f.seek(0)
        f.truncate()
        f.write(_format_stats(rows))


def rewrite_url(text: str, url: str) -> str:
    """``text`` with the URL of every ``sae-optimality-companion @ git+URL"`` install line and
    of the set-up cell's ``git clone`` replaced by ``url``."""
    swap = lambda m: m.group(1) + url + m.group(3)
    return _CLONE_URL.sub(swap, _GIT_URL.sub(swap, text))


def set_url(url: str | None = None, root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """Write ``url`` (default: ``repository.url`` of ``root/_config.yml``) into every chapter's
    set-up cell (``.md`` and stored ``.ipynb``) and into the install lines of README and intro.

    Only the first code cell of a notebook is touched, and only its URL: outputs and every other
    cell stay as they are, so no re-execution is needed. Returns the files changed.
    """
    url = url or repository_url(root)
    changed = []
    for md in paired_chapters(root / "book"):
        text = md.read_text()
        start = text.find("```{code-cell}")
        end = text.find("```", start + 3)
        if start >= 0:
            new = text[:start] + rewrite_url(text[start:end], url) + text[end:]
            if new != text:
                md.write_text(new)
                changed.append(md)
        ipynb = md.with_suffix(".ipynb")
        if ipynb.exists():
            nb = nbformat.read(ipynb, as_version=4)
            code = [c for c in nb.cells if c.cell_type == "code"]
            if code and rewrite_url(code[0].source, url) != code[0].source:
                code[0].source = rewrite_url(code[0].source, url)
                _write(nb, ipynb)
                changed.append(ipynb)
    for name in URL_FILES:
        path = root / name
        if path.exists() and rewrite_url(path.read_text(), url) != path.read_text():
            path.write_text(rewrite_url(path.read_text(), url))
            changed.append(path)
    return changed


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
        problems += check_glue(md.read_text(), stored, ipynb.name)
    stray = sorted(p.name for p in BOOK.glob("*.ipynb") if not p.with_suffix(".md").exists())
    problems += [f"{name}: notebook without a paired .md" for name in stray]
    problems += _check_stats()
    problems += _check_urls()
    return problems


# A glue reference of the prose: {glue}`name`, {glue:text}`name:.2f`, and a value glued in another
# chapter, {glue:text}`ch07_real_representations.ipynb::name:.2f`
_GLUE_REF = re.compile(r"\{glue(?::\w+)?\}`(?:([\w.-]+\.ipynb)::)?([\w.-]+)(?::([^`]*))?`")
_GLUE_MIME = "application/papermill.record/text/plain"


def glued_values(nb: nbformat.NotebookNode) -> dict[str, str]:
    """The stored text of every glued value of ``nb``, by name."""
    values = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            text = out.get("data", {}).get(_GLUE_MIME)
            if name and text is not None:
                values[name] = "".join(text) if isinstance(text, list) else text
    return values


def check_glue(prose: str, nb: nbformat.NotebookNode, label: str, book: pathlib.Path = BOOK) -> list[str]:
    """Glued floats store only the digits the prose shows.

    A float stored at full precision differs in its last digits on another CPU, so nbval would
    compare bits no reader sees. For each reference ``{glue:text}`name:SPEC``` whose stored value
    is a float, formatting the value with SPEC and reading it back must give the stored value
    (store with ``companion.glue(name, value, SPEC)``); a reference to a name that no cell glued
    is reported too. A reference ``other.ipynb::name`` is looked up in that notebook of ``book``.
    """
    problems = []
    stores = {"": glued_values(nb)}
    for other, name, spec in _GLUE_REF.findall(prose):
        if other not in stores:
            path = book / other
            stores[other] = glued_values(nbformat.read(path, as_version=4)) if path.exists() else {}
        values = stores[other]
        where = f"{other}::{name}" if other else name
        if name not in values:
            problems.append(f"{label}: the prose refers to glue {where!r}, which no cell stores")
            continue
        try:
            v = float(values[name])
        except ValueError:
            continue
        if not spec:
            if re.fullmatch(r"-?\d+\.\d{7,}(e[-+]\d+)?", values[name].strip()):
                problems.append(f"{label}: glue {where!r} is shown unformatted at full precision ({values[name]})")
            continue
        try:
            shown = float(format(v, spec))
        except ValueError:
            problems.append(f"{label}: glue {where!r}: bad format spec {spec!r}")
            continue
        if shown != v:
            problems.append(f"{label}: glue {where!r} stores {values[name]} but the prose shows it as "
                            f"{format(v, spec)}; store only the digits shown "
                            f"(companion.glue({name!r}, value, {spec!r}))")
    return problems


def _check_stats() -> list[str]:
    """Every chapter has a statistics row whose cell counts match its stored notebook."""
    problems = []
    stats = read_stats()
    for md in paired_chapters():
        ipynb = md.with_suffix(".ipynb")
        if not ipynb.exists():
            continue
        row = stats.get(md.stem)
        if row is None:
            problems.append(f"{STATS.name}: no row for {md.stem}; run `make execute`")
            continue
        nb = nbformat.read(ipynb, as_version=4)
        cells = str(len(nb.cells)), str(sum(c.cell_type == "code" for c in nb.cells))
        if (row["Cells"], row["Code cells"]) != cells:
            problems.append(f"{STATS.name}: {md.stem} recorded {row['Cells']}/{row['Code cells']} "
                            f"cells/code cells, its notebook has {cells[0]}/{cells[1]}; run `make execute`")
    return problems


def _check_urls() -> list[str]:
    """README's and the intro's install lines name the URL of ``_config.yml``."""
    url = repository_url()
    problems = []
    for name in URL_FILES:
        found = [m.group(2) for m in _GIT_URL.finditer((ROOT / name).read_text())]
        if not found:
            problems.append(f"{name}: no `sae-optimality-companion @ git+URL` install line")
        elif any(u != url for u in found):
            problems.append(f"{name}: install line names {found}, _config.yml says {url}; "
                            "run `python tools/notebooks.py set-url`")
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"execute", "check", "set-url"}:
        print(__doc__)
        return 2
    if argv[0] == "set-url":
        if len(argv) > 2:
            print("set-url takes at most one URL")
            return 2
        for path in set_url(argv[1] if len(argv) == 2 else None):
            print(f"rewrote {path.relative_to(ROOT)}")
        return 0
    if argv[0] == "check":
        problems = check()
        for p in problems:
            print(p)
        return 1 if problems else 0
    chapters, unknown = select_chapters(argv[1:])
    if unknown:
        print(f"execute: no chapter named {unknown}")
        return 2
    for md in chapters:
        print(f"executing {md.relative_to(ROOT)}", flush=True)
        row = execute(md)
        print(f"  {row['Cells']} cells, {row['Run time (s)']} s on {row['CPU cores']} "
              f"CPU cores ({row['Device']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
