"""mkdocs hook (mkdocs.yml `hooks:`): the site's home page is the repository's README.md, the front page with the
install and the first run, instead of a copy that could drift from it.

README.md lives at the repository root, where GitHub shows it and where `pyproject.toml` names it, outside mkdocs'
`docs_dir`. At build time this hook adds it to the site as `index.md`, its links into the manual rewritten from
`docs/page.md` to `page.md` (they are relative to the root there, to docs/ on the site), and the manual's links to
the front page from `../README.md` (right on GitHub) to `index.md`. A README link to any other file of the
repository would point outside the site: `mkdocs build --strict` then fails on it, as it should.
docs/README.md, the manual's table of contents for readers browsing docs/ on GitHub, is left out of the site
(`exclude_docs`): the home page holds the same table.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

DOCS_LINK = re.compile(r"\]\(docs/")
FRONT_PAGE_LINK = re.compile(r"\]\(\.\./README\.md")


def on_files(files: Files, config) -> Files:
    """Add README.md, its links made relative to docs/, as the site's index.md."""
    readme = Path(config.config_file_path).parent / "README.md"
    files.append(File.generated(config, "index.md", content=DOCS_LINK.sub("](", readme.read_text())))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """A manual page's `../README.md` (the front page on GitHub) is the site's index.md."""
    return FRONT_PAGE_LINK.sub("](index.md", markdown)


def on_serve(server, config, builder):
    """`mkdocs serve` rebuilds when README.md changes too (it watches docs_dir and mkdocs.yml only)."""
    server.watch(str(Path(config.config_file_path).parent / "README.md"))
    return server
