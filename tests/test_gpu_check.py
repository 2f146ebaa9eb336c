"""tools/gpu_check.py: the comparison of a run's text outputs with the stored ones, on the CPU.

A three-cell notebook is built in a temporary folder and executed twice, as `make gpu-check`
executes the chapters; one stored output is then perturbed on purpose.
"""

import copy
import pathlib
import sys

import jupytext
import nbformat
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import gpu_check  # noqa: E402
import notebooks  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A markdown notebook, its stored execution, and a second execution of it."""
    folder = tmp_path_factory.mktemp("book")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A tiny chapter"),
        nbformat.v4.new_code_cell('print(f"loss = {0.5:.3f}")'),
        nbformat.v4.new_code_cell("from IPython.display import Markdown\n"
                                  'display(Markdown("**T2** = 0.0"))\n{"atoms": 3}'),
        nbformat.v4.new_code_cell('import companion\ncompanion.glue("gap", 0.123456, ".2f")'),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    md = folder / "tiny.md"
    jupytext.write(nb, md, fmt="md:myst")
    stored = notebooks.run_notebook(md)
    notebooks._write(stored, md.with_suffix(".ipynb"))
    return md, stored, notebooks.run_notebook(md)


def test_two_executions_have_the_same_text_outputs(tiny):
    _, stored, new = tiny
    assert gpu_check.text_outputs(new.cells[1]) == ["[stdout]\nloss = 0.500\n"]
    assert gpu_check.text_outputs(new.cells[2]) == [
        "[text/plain]\n<IPython.core.display.Markdown object>",
        "[text/markdown]\n**T2** = 0.0",
        "[text/plain]\n{'atoms': 3}",
    ]
    assert gpu_check.text_outputs(new.cells[3]) == ["[application/papermill.record/text/plain]\n0.12"]
    assert gpu_check.compare(stored, new, "tiny.ipynb") == []


def test_a_perturbed_output_is_reported_with_its_cell_and_a_diff(tiny):
    _, stored, new = tiny
    changed = copy.deepcopy(new)
    changed.cells[1].outputs[0]["text"] = "loss = 0.501\n"
    diffs = gpu_check.compare(stored, changed, "tiny.ipynb", "this run (CUDA)")
    assert [(d.notebook, d.cell) for d in diffs] == [("tiny.ipynb", 1)]
    text = str(diffs[0])
    assert text.startswith("tiny.ipynb cell 1: text output differs")
    assert "-loss = 0.500" in text and "+loss = 0.501" in text and "this run (CUDA)" in text


def test_a_changed_glued_value_is_reported(tiny):
    _, stored, new = tiny
    changed = copy.deepcopy(new)
    changed.cells[3].outputs[0]["data"]["application/papermill.record/text/plain"] = "0.13"
    diffs = gpu_check.compare(stored, changed, "tiny.ipynb")
    assert [(d.notebook, d.cell) for d in diffs] == [("tiny.ipynb", 3)]


def test_images_are_not_compared_but_errors_are(tiny):
    _, stored, new = tiny
    with_png = copy.deepcopy(new)
    with_png.cells[2].outputs.append(nbformat.v4.new_output(
        "display_data", data={"image/png": "iVBORw0KGgo="}))
    assert gpu_check.compare(stored, with_png, "tiny.ipynb") == []
    failed = copy.deepcopy(new)
    failed.cells[1].outputs = [nbformat.v4.new_output("error", ename="RuntimeError",
                                                      evalue="CUDA out of memory", traceback=[])]
    diffs = gpu_check.compare(stored, failed, "tiny.ipynb")
    assert [d.cell for d in diffs] == [1] and "+RuntimeError: CUDA out of memory" in diffs[0].diff


def test_an_out_of_date_stored_notebook_is_one_difference(tiny):
    _, stored, new = tiny
    edited = copy.deepcopy(new)
    edited.cells[1].source = 'print("something else")'
    diffs = gpu_check.compare(stored, edited, "tiny.ipynb")
    assert len(diffs) == 1 and diffs[0].cell is None and "out of date" in diffs[0].what


def test_check_chapter_executes_into_scratch_and_compares(tiny, tmp_path):
    md, stored, _ = tiny
    perturbed = copy.deepcopy(stored)
    perturbed.cells[1].outputs[0]["text"] = "loss = 0.499\n"
    notebooks._write(perturbed, md.with_suffix(".ipynb"))
    try:
        diffs = gpu_check.check_chapter(md, tmp_path, "this run (CPU)")
    finally:
        notebooks._write(stored, md.with_suffix(".ipynb"))
    assert [d.cell for d in diffs] == [1]
    assert (tmp_path / "tiny.ipynb").exists()       # the run went to scratch, not over the stored one
    assert nbformat.read(md.with_suffix(".ipynb"), as_version=4).cells[1].outputs[0]["text"] == "loss = 0.500\n"


def test_without_cuda_it_says_so_and_exits_zero(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "_cuda", lambda: False)
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_bench_failures_and_missing_gpu_lines_are_differences(tmp_path):
    silent = tmp_path / "bench_silent.py"
    silent.write_text('# would use cuda, but prints no GPU line\nprint("done")\n')
    broken = tmp_path / "bench_broken.py"
    broken.write_text('raise SystemExit("peer missing")\n')
    assert gpu_check.run_bench([silent], cuda=False) == []
    found = gpu_check.run_bench([silent, broken], cuda=True)
    assert [(d.notebook, d.what) for d in found] == [
        ("bench_silent.py", "uses CUDA but printed no GPU line"),
        ("bench_broken.py", "exited with 1"),
    ]
    assert "peer missing" in found[1].diff
