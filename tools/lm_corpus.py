"""Build the text corpus of Chapter 8: Python's documentation topics, the standard library's and NumPy's docstrings.

Written once with the pinned Python (the text of both depends on the Python version) and
committed as ``companion/data/python_docs_corpus.jsonl.gz``, so every machine, Colab included,
reads the same documents (``companion.lm.docs_corpus``). Licences of the text: the Python
Software Foundation License (Python's documentation and the standard library's source) and
NumPy's BSD-3-Clause licence (NumPy's docstrings).

A document is one paragraph (text between blank lines) of one *source*: a topic of
``pydoc_data.topics`` (the text of ``help("for")`` and the like) or one public module of the
standard library or of NumPy (submodules of packages included) (its docstring and the docstrings of the classes, functions and methods it
defines). Paragraphs of fewer than 8 words are dropped, a paragraph seen before (in any source)
is dropped, and paragraphs longer than 70 words are cut at line ends into pieces of at most
about 70 words, so that a document fits the model's 128-token window. Sources are in sorted
order, paragraphs in the order they appear. Each line of the file is a JSON object
``{"source": ..., "text": ...}``; the held-out split is by source (``companion.lm.docs_corpus``).

    python tools/lm_corpus.py            # rewrites companion/data/python_docs_corpus.jsonl.gz
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import inspect
import io
import importlib.util
import json
import pathlib
import pkgutil
import re
import sys
import warnings

OUT = pathlib.Path(__file__).resolve().parents[1] / "companion" / "data" / "python_docs_corpus.jsonl.gz"
MIN_WORDS, MAX_WORDS = 8, 70
# Beyond the standard library: NumPy's docstrings (BSD-3-Clause licence), the version pinned in
# constraints.txt.
EXTRA = ("numpy",)
# Modules whose import has side effects (a browser, printing, a GUI) or that are not documentation.
SKIP = {"antigravity", "this", "idlelib", "turtledemo", "turtle", "tkinter", "__phello__",
        "__hello__", "lib2to3", "test", "pydoc_data", "ensurepip", "venv", "msilib", "winreg",
        "winsound", "_msi", "nt", "msvcrt", "_winapi", "_overlapped", "_wmi"}


def paragraphs(text: str) -> list[str]:
    """Paragraphs of ``text`` with at least MIN_WORDS words, long ones cut at line ends."""
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        para = para.strip("\n").rstrip()
        if len(para.split()) < MIN_WORDS:
            continue
        piece: list[str] = []
        for line in para.split("\n"):
            if piece and len(" ".join(piece).split()) + len(line.split()) > MAX_WORDS:
                out.append("\n".join(piece))
                piece = []
            piece.append(line)
        if len(" ".join(piece).split()) >= MIN_WORDS:
            out.append("\n".join(piece))
    return out


def module_docstrings(name: str) -> str:
    """The docstring of module ``name`` and of the public classes, functions and methods it defines."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        mod = importlib.import_module(name)
    docs = [inspect.getdoc(mod) or ""]
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = vars(mod)[attr]
        if getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            docs.append(inspect.getdoc(obj) or "")
            for meth in sorted(vars(obj)):
                if not meth.startswith("_") and callable(vars(obj)[meth]):
                    docs.append(inspect.getdoc(vars(obj)[meth]) or "")
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            docs.append(inspect.getdoc(obj) or "")
    return "\n\n".join(d for d in docs if d)


def public_modules(tops) -> list[str]:
    """Public modules of the packages ``tops``, submodules included (tests excluded), sorted."""
    names = set()
    for top in tops:
        if top in SKIP or top.startswith("_"):
            continue
        names.add(top)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spec = importlib.util.find_spec(top)
        except Exception:
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=top + ".",
                                          onerror=lambda _: None):
            parts = info.name.split(".")
            if not any(p.startswith("_") or p in SKIP or p in ("tests", "testing") for p in parts):
                names.add(info.name)
    return sorted(names)


def main() -> None:
    from pydoc_data.topics import topics

    sources: list[tuple[str, str]] = [(f"topic:{k}", topics[k]) for k in sorted(topics)]
    for name in public_modules(sys.stdlib_module_names) + public_modules(EXTRA):
        try:
            sources.append((f"module:{name}", module_docstrings(name)))
        except Exception:          # not importable on this platform
            continue
    seen, rows = set(), []
    for source, text in sources:
        for para in paragraphs(text):
            if para not in seen:
                seen.add(para)
                rows.append({"source": source, "text": para})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    words = sum(len(r["text"].split()) for r in rows)
    print(f"{len(rows)} documents, {words} words, {len({r['source'] for r in rows})} sources "
          f"(Python {sys.version.split()[0]}, NumPy {importlib.import_module('numpy').__version__}) -> {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
