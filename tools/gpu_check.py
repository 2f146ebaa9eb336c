"""``make gpu-check``: do the chapters print on a GPU exactly what they stored on the CPU?

The book promises that every chapter picks CUDA when it is there and that what it prints
does not depend on the device (rounded numbers, no device names or timings). On a machine
with CUDA this script tests that promise:

1. it executes every chapter (or those named) from its ``.md`` with CUDA, exactly as
   ``tools/notebooks.py execute`` does, into a scratch folder (the stored notebooks are not
   touched), and compares each code cell's *text* outputs with the stored CPU outputs:
   stream text (stdout/stderr), the ``text/plain``, ``text/markdown``, ``text/html`` and
   ``text/latex`` forms of results and displays, the text of glued values, and errors; images (PNG, SVG, …) are not
   compared, since plots may differ in the last pixel;
2. it runs the benchmark scripts of ``bench/`` (``bench_convex.py`` with ``--quick``), which
   add their GPU lines when CUDA is present, and fails if one fails or, when its source uses
   CUDA, prints no GPU line;
3. it exits 1 on any difference, printing the notebook, the cell and a short diff; 0 when
   everything agrees.

Without CUDA it says so and exits 0 (``--cpu`` runs the comparison on the CPU anyway: a
determinism check of the stored outputs). Nothing is fetched from the network
(``HF_HUB_OFFLINE=1``); on one GPU it takes a few minutes.

    python tools/gpu_check.py [CHAPTER ...] [--scratch DIR] [--no-bench] [--cpu]
"""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import nbformat

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import notebooks  # noqa: E402

ROOT = notebooks.ROOT
BENCH = ROOT / "bench"
# Extra arguments per benchmark script, so that the whole check stays at a few minutes.
BENCH_ARGS = {"bench_convex.py": ["--quick"]}
BENCH_TIMEOUT_S = 900
# the text forms of results and displays, and the text of glued values (what the prose shows)
TEXT_MIMES = ("text/plain", "text/markdown", "text/html", "text/latex",
              "application/papermill.record/text/plain")
MAX_DIFF_LINES = 24


@dataclass
class Difference:
    """One place where a run disagrees with the stored notebook."""

    notebook: str
    cell: int | None  # index among all cells of the notebook; None for the whole notebook
    what: str
    diff: str = ""

    def __str__(self) -> str:
        where = self.notebook if self.cell is None else f"{self.notebook} cell {self.cell}"
        return f"{where}: {self.what}" + (f"\n{self.diff}" if self.diff else "")


def text_outputs(cell: nbformat.NotebookNode) -> list[str]:
    """The text a code cell showed, one labelled block per output; images are left out."""
    blocks = []
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if kind == "stream":
            blocks.append(f"[{out.get('name', 'stdout')}]\n{out.get('text', '')}")
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            for mime in TEXT_MIMES:
                if mime in data:
                    text = data[mime]
                    blocks.append(f"[{mime}]\n{''.join(text) if isinstance(text, list) else text}")
        elif kind == "error":
            blocks.append(f"[error]\n{out.get('ename', '')}: {out.get('evalue', '')}")
    return blocks


def _short_diff(stored: list[str], new: list[str], label: str) -> str:
    a = "\n".join(stored).splitlines()
    b = "\n".join(new).splitlines()
    lines = list(difflib.unified_diff(a, b, "stored (CPU)", label, n=1, lineterm=""))
    if len(lines) > MAX_DIFF_LINES:
        lines = lines[:MAX_DIFF_LINES] + [f"... ({len(lines) - MAX_DIFF_LINES} more diff lines)"]
    return "\n".join("    " + line for line in lines)


def compare(stored: nbformat.NotebookNode, new: nbformat.NotebookNode, name: str,
            label: str = "this run") -> list[Difference]:
    """Cell by cell, the text outputs of ``new`` against those of ``stored``.

    The notebooks must have the same cells (types and sources): otherwise the stored notebook
    is out of date and one difference saying so is returned.
    """
    if notebooks._cells(stored) != notebooks._cells(new):
        return [Difference(name, None, "its cells differ from the stored notebook's "
                                       "(out of date: run `make execute` first)")]
    diffs = []
    for i, (a, b) in enumerate(zip(stored.cells, new.cells)):
        if a.cell_type != "code":
            continue
        ta, tb = text_outputs(a), text_outputs(b)
        if ta != tb:
            diffs.append(Difference(name, i, "text output differs", _short_diff(ta, tb, label)))
    return diffs


def check_chapter(md: pathlib.Path, scratch: pathlib.Path, label: str) -> list[Difference]:
    """Execute ``md`` into ``scratch`` and compare it with the stored ``.ipynb`` beside ``md``."""
    from nbclient.exceptions import CellExecutionError

    stored_path = md.with_suffix(".ipynb")
    if not stored_path.exists():
        return [Difference(stored_path.name, None, "no stored notebook to compare with")]
    try:
        new = notebooks.run_notebook(md)
    except CellExecutionError as e:
        return [Difference(stored_path.name, None, "execution failed", str(e)[-2000:])]
    notebooks._write(new, scratch / stored_path.name)
    return compare(nbformat.read(stored_path, as_version=4), new, stored_path.name, label)


def run_bench(scripts: list[pathlib.Path], cuda: bool) -> list[Difference]:
    """Run each benchmark script; print its GPU lines; a failure (or no GPU line) is a difference."""
    problems = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for script in scripts:
        cmd = [sys.executable, str(script), *BENCH_ARGS.get(script.name, [])]
        print(f"running {' '.join(['bench/' + script.name, *cmd[2:]])}", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=BENCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            problems.append(Difference(script.name, None, f"did not finish in {BENCH_TIMEOUT_S} s"))
            continue
        gpu_lines = [line for line in done.stdout.splitlines() if "GPU" in line]
        measured = [line for line in gpu_lines if "no CUDA" not in line]
        for line in gpu_lines:
            print(f"  {line.strip()}")
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        if done.returncode != 0:
            tail = "\n".join("    " + line for line in done.stderr.strip().splitlines()[-10:])
            problems.append(Difference(script.name, None, f"exited with {done.returncode}", tail))
        elif cuda and "cuda" in script.read_text() and not measured:
            problems.append(Difference(script.name, None, "uses CUDA but printed no GPU line"))
    return problems


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapters", nargs="*", help="chapter stems (default: every chapter)")
    ap.add_argument("--scratch", type=pathlib.Path, help="folder for the executed notebooks "
                    "(default: a new temporary folder, kept for inspection)")
    ap.add_argument("--no-bench", action="store_true", help="skip the benchmark scripts")
    ap.add_argument("--cpu", action="store_true", help="compare even without CUDA (a CPU re-run "
                    "against the stored outputs: a determinism check)")
    args = ap.parse_args(argv)

    cuda = _cuda()
    if not cuda and not args.cpu:
        print("gpu-check: no CUDA device here, so nothing was compared. On a machine with CUDA "
              "it executes every chapter there and compares each cell's text outputs with the "
              "stored CPU outputs, and runs bench/ with its GPU lines.")
        return 0
    os.environ["HF_HUB_OFFLINE"] = "1"       # nothing from the network, in the kernels too
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    label = "this run (CUDA)" if cuda else "this run (CPU)"
    chapters, unknown = notebooks.select_chapters(args.chapters)
    if unknown:
        print(f"gpu-check: no chapter named {unknown}")
        return 2
    scratch = args.scratch or pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-"))
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"gpu-check: executing {len(chapters)} chapters on {'CUDA' if cuda else 'the CPU'} "
          f"into {scratch}", flush=True)

    problems: list[Difference] = []
    for md in chapters:
        start = time.perf_counter()
        found = check_chapter(md, scratch, label)
        print(f"  {md.stem}: {'same text outputs' if not found else f'{len(found)} differences'} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        problems += found
    if not args.no_bench:
        problems += run_bench(sorted(BENCH.glob("bench_*.py")), cuda)

    for p in problems:
        print(p)
    print(f"gpu-check: {'FAILED, ' + str(len(problems)) + ' differences' if problems else 'no differences'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
