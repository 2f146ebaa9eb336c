"""The book's notebooks: paired with their markdown, executed, and starting with the set-up cell."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import notebooks  # noqa: E402


def test_every_chapter_is_paired_executed_and_set_up():
    chapters = notebooks.paired_chapters()
    assert chapters, "no paired chapter notebooks found in book/"
    assert notebooks.check() == []


def test_setup_cell_takes_the_repository_url_from_config():
    url = notebooks.repository_url()
    assert url.startswith("https://")
    assert f"git clone -q --depth 1 {url} " in notebooks.setup_cell_source()


@pytest.mark.parametrize("chapter", ["ch01_sae_to_joint", "ch08_language_model"])
def test_setup_cell_colab_branch_is_valid_ipython_and_works_in_the_clone(chapter):
    """In Colab the cell clones the repository, installs it (with the chapter's extras) and
    changes into its book/ folder, where the chapters' relative paths (../tools/...) resolve."""
    from IPython.core.inputtransformer2 import TransformerManager

    source = notebooks.setup_cell_source(chapter)
    compile(TransformerManager().transform_cell(source), chapter, "exec")
    assert '%pip install -q "/content/optimality-companion' in source
    assert source.index("git clone") < source.index("%pip") < source.index("%cd /content/optimality-companion/book")
    if chapter in notebooks.CHAPTER_EXTRAS:
        assert f"[{notebooks.CHAPTER_EXTRAS[chapter]}]" in source


@pytest.mark.parametrize("md", notebooks.paired_chapters(), ids=lambda p: p.stem)
def test_chapter_is_in_the_table_of_contents(md):
    toc = (notebooks.ROOT / "_toc.yml").read_text()
    assert f"book/{md.stem}" in toc


def _paired_md(path):
    path.write_text("---\njupytext:\n  formats: ipynb,md:myst\n---\n\n# A chapter\n")
    return path


def test_statistics_rows_are_sorted_replaced_and_pruned(tmp_path):
    stats = tmp_path / "execution_stats.csv"
    for name in ("ch02_b", "ch01_a"):
        _paired_md(tmp_path / f"{name}.md")
    row = lambda ch, s: {"Chapter": f"{{doc}}`{ch}`", "Cells": "3", "Code cells": "2",  # noqa: E731
                         "Run time (s)": str(s), "CPU cores": "2", "Device": "cpu"}
    notebooks.record_stats(row("ch02_b", 40), stats, tmp_path)
    notebooks.record_stats(row("ch01_a", 12), stats, tmp_path)
    notebooks.record_stats(row("ch02_b", 41), stats, tmp_path)   # a re-run changes only its time
    assert stats.read_text() == ("Chapter,Cells,Code cells,Run time (s),CPU cores,Device\n"
                                 "{doc}`ch01_a`,3,2,12,2,cpu\n"
                                 "{doc}`ch02_b`,3,2,41,2,cpu\n")
    (tmp_path / "ch02_b.md").unlink()                              # a removed chapter loses its row
    notebooks.record_stats(row("ch01_a", 12), stats, tmp_path)
    assert list(notebooks.read_stats(stats)) == ["ch01_a"]


def test_statistics_row_rounds_the_time_and_counts_cells():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("x"),
                                         nbformat.v4.new_code_cell("1")])
    row = notebooks.stats_row("ch09_x", nb, 12.6)
    assert row["Chapter"] == "{doc}`ch09_x`" and notebooks._chapter_of(row) == "ch09_x"
    assert (row["Cells"], row["Code cells"], row["Run time (s)"]) == ("2", "1", "13")
    assert list(row) == notebooks.STATS_HEADER


def test_set_url_rewrites_only_the_url_of_every_setup_cell_and_install_line(tmp_path):
    import shutil

    import nbformat

    (tmp_path / "book").mkdir()
    chapter = "ch01_sae_to_joint"
    for suffix in (".md", ".ipynb"):
        shutil.copy(notebooks.BOOK / f"{chapter}{suffix}", tmp_path / "book" / f"{chapter}{suffix}")
    for name in notebooks.URL_FILES:
        shutil.copy(notebooks.ROOT / name, tmp_path / name)
    old = notebooks.repository_url()
    fork = "https://example.org/someone/fork"
    (tmp_path / "_config.yml").write_text((notebooks.ROOT / "_config.yml").read_text().replace(old, fork))
    before = {p: p.read_text() for p in tmp_path.rglob("*.*")}

    changed = notebooks.set_url(root=tmp_path)
    assert sorted(p.name for p in changed) == sorted([f"{chapter}.md", f"{chapter}.ipynb", "README.md", "intro.md"])
    for p in changed:                                   # only the URL changed, nothing around it
        assert p.read_text() == before[p].replace(old, fork)
        assert fork in p.read_text()
    nb = nbformat.read(tmp_path / "book" / f"{chapter}.ipynb", as_version=4)
    setup = next(c for c in nb.cells if c.cell_type == "code")
    assert setup.source == notebooks.setup_cell_source(chapter, url=fork)
    assert notebooks.set_url(root=tmp_path) == []       # a second run has nothing to do


def test_readme_and_intro_install_lines_name_the_configured_url():
    assert notebooks._check_urls() == []
    assert notebooks.rewrite_url('pip install "sae-optimality-companion[lm] @ git+https://a/b"', "https://c/d") \
        == 'pip install "sae-optimality-companion[lm] @ git+https://c/d"'


def test_the_statistics_page_renders_the_csv_and_is_in_the_table_of_contents():
    page = (notebooks.BOOK / "execution.md").read_text()
    assert "```{csv-table}\n:file: execution_stats.csv\n:header-rows: 1" in page
    assert "book/execution" in (notebooks.ROOT / "_toc.yml").read_text()
    header = notebooks.STATS.read_text().splitlines()[0]
    assert header.split(",") == notebooks.STATS_HEADER


def _glued_notebook(values):
    """A notebook whose one code cell stored ``values`` the way companion.glue does."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("...")
    cell.outputs = [nbformat.v4.new_output(
        "display_data", data={"application/papermill.record/text/plain": text},
        metadata={"scrapbook": {"name": name, "mime_prefix": "application/papermill.record/"}})
        for name, text in values.items()]
    nb.cells = [cell]
    return nb


def test_glued_floats_store_only_the_digits_the_prose_shows(tmp_path):
    import nbformat

    nb = _glued_notebook({"gap": "0.12", "raw": "12.405896186828613", "n": "7"})
    assert notebooks.check_glue("gap {glue:text}`gap:.2f`, n {glue:text}`n`", nb, "x.ipynb") == []
    [too_many] = notebooks.check_glue("{glue:text}`raw:.2f`", nb, "x.ipynb")
    assert "stores 12.405896186828613 but the prose shows it as 12.41" in too_many
    assert "'.2f'" in too_many
    [bare] = notebooks.check_glue("{glue:text}`raw`", nb, "x.ipynb")
    assert "full precision" in bare
    [missing] = notebooks.check_glue("{glue:text}`nope:.1f`", nb, "x.ipynb")
    assert "which no cell stores" in missing
    [coarser] = notebooks.check_glue("{glue:text}`gap:.1f`", nb, "x.ipynb")   # 0.12 shown as 0.1
    assert "shows it as 0.1" in coarser
    nbformat.write(_glued_notebook({"t2": "0.011", "t2_raw": "0.0113456789"}), tmp_path / "other.ipynb")
    prose = "{glue:text}`other.ipynb::t2:.3f` and {glue:text}`other.ipynb::t2_raw:.3f`"
    [cross] = notebooks.check_glue(prose, nb, "x.ipynb", tmp_path)
    assert "'other.ipynb::t2_raw' stores 0.0113456789" in cross
