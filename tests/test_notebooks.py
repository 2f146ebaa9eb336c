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
    assert f"git+{url}" in notebooks.setup_cell_source()


@pytest.mark.parametrize("md", notebooks.paired_chapters(), ids=lambda p: p.stem)
def test_chapter_is_in_the_table_of_contents(md):
    toc = (notebooks.ROOT / "_toc.yml").read_text()
    assert f"book/{md.stem}" in toc
