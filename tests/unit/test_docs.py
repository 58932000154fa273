"""The docs stay true: docs/cli.md matches the parser, every relative link resolves, the README stays a front page."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from trainer.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "tools" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a `# comment` in a shell block is no heading, a link no link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == _cli_docs().render(), (
        "docs/cli.md is stale: run python tools/cli_docs.py"
    )


def test_every_train_flag_is_in_the_cli_reference():
    parser, _ = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    reference = (ROOT / "docs" / "cli.md").read_text()
    flags = [flag for action in commands.choices["train"]._actions for flag in action.option_strings]
    missing = [flag for flag in flags if flag not in ("-h", "--help") and f"`{flag}" not in reference]
    assert not missing, f"docs/cli.md lacks {missing}: run python tools/cli_docs.py"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or ROOT not in (file, *file.parents):
            broken.append(f"{target} (no such file in the repository)")
        elif anchor and (file.suffix != ".md" or anchor not in _anchors(file)):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines; the manual belongs in docs/"


def test_no_page_points_outside_the_repository():
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "/work/" not in text, f"{page.relative_to(ROOT)} names a path outside"
