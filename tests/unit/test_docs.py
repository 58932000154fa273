"""The docs stay true: docs/cli.md matches the parser, every relative link resolves, the README stays a front page
whose sample output has the report's current shape, install lines name this repository's extras, and the site
builds with `mkdocs build --strict`."""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import build_parser
from trainer.config import UserError

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _cli_docs():
    return _tool("cli_docs")


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


def test_every_default_is_visible():
    """A default of blanks (--label-delimiter's space) is named, not rendered as "(default: )"."""
    assert "(default: )" not in (ROOT / "docs" / "cli.md").read_text()
    assert "(default: space)" in (ROOT / "docs" / "cli.md").read_text()


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


def test_readme_sample_output_has_the_reports_shape(tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    """README's sample (tools/readme_sample.py, from a full default run) and a 1-epoch run print the same lines in the
    same order with the same words; only numbers and names differ. Fails when the report changes and README does not
    follow: run python tools/readme_sample.py."""
    from trainer.cli import main

    sample = _tool("readme_sample")
    monkeypatch.chdir(tmp_path)  # the run folder prints as runs/train/exp, as in README
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "wandb", sys.modules.get("wandb"))  # --tracker none stubs it out; undo after
    assert main(sample.TINY_RUN) == 0
    ran = sample.line_shapes(sample.shown(capsys.readouterr().out))
    readme = sample.line_shapes(sample.readme_lines((ROOT / "README.md").read_text()))
    assert readme == ran, "README.md's sample output is stale: run python tools/readme_sample.py"
    assert any(line.startswith("task: ") for line in ran) and any("reliability.png" in line for line in ran)


def test_line_shapes_see_format_changes_not_numbers():
    sample = _tool("readme_sample")
    run = [
        "m on builtin:x (9 train / 1 val, 2 classes)",
        "epoch 1/2  top1 0.5000  1.2s  *best",
        "epoch 2/2  top1 0.75  13.0s",
    ]
    assert sample.line_shapes(run) == sample.line_shapes([run[0].replace("9", "90"), run[1]])
    assert sample.line_shapes(run) != sample.line_shapes([*run, "calibration: ECE 0.1"])
    assert sample.line_shapes(run) != sample.line_shapes([run[0], run[1].replace("top1", "acc1")])


INSTALL_OF_PYPI_NAME = re.compile(r"trainer\[")  # `pip install 'trainer[dali]'` installs PyPI's unrelated "trainer"


def test_install_lines_name_this_repositorys_extras():
    files = [ROOT / "README.md", ROOT / "pyproject.toml", *(ROOT / "docs").glob("*.md")]
    files += [
        p
        for folder in ("trainer", "tools", "bench", "configs", "accelerate_configs")
        for p in (ROOT / folder).rglob("*")
    ]
    found = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in files
        if path.is_file() and path.suffix in (".md", ".py", ".toml", ".yaml", ".sh", ".sbatch")
        for line in path.read_text().splitlines()
        if INSTALL_OF_PYPI_NAME.search(line)
    ]
    assert not found, f"name the checkout's extras (pip install -e \".[dali]\"), not PyPI's trainer: {found}"


def test_site_builds_strict(tmp_path):
    """mkdocs.yml builds with --strict (every link and anchor resolves on the site), README.md as its home page."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip('mkdocs-material is not installed (pip install -e ".[docs]")')
    site = tmp_path / "site"
    cmd = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--config-file",
        str(ROOT / "mkdocs.yml"),
        "-d",
        str(site),
    ]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    home = (site / "index.html").read_text()
    assert "Install and test" in home and 'href="training/"' in home  # README, its docs/ links made site-relative


def _documented_commands():
    """(page, line, argv) of every trainer command in the pages' shell blocks, under any launcher. Placeholders are
    filled in: `[--opt X]` given, `a|b` the first, `--flag ...` a value, a bare `...` dropped."""
    for page in PAGES:
        for block in re.findall(r"^```(?:bash|sh)?\n(.*?)^```", page.read_text(), flags=re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                command = re.split(r"\s#\s", line)[0].strip()
                found = re.match(
                    r"(?:trainer|python -m trainer|(?:accelerate launch|torchrun) .*?-m trainer) (.*)$", command
                )
                if not found:
                    continue
                text = re.sub(r"(\S+?)\|\S+", r"\1", re.sub(r"\[([^\]]*)\]", r"\1", found.group(1)))
                words = shlex.split(text)
                argv = [
                    ("VALUE" if i and words[i - 1].startswith("--") else None) if w == "..." else w
                    for i, w in enumerate(words)
                ]
                yield page, line.strip(), [w for w in argv if w is not None]


def test_documented_commands_parse():
    """Every `trainer ...` line of README and docs/ names real subcommands, flags and choices (parsed, not run)."""
    parser, _ = build_parser()
    commands = list(_documented_commands())
    assert len(commands) > 20
    wrong = []
    for page, line, argv in commands:
        try:
            parser.parse_args(argv)
        except (UserError, SystemExit) as e:
            wrong.append(f"{page.relative_to(ROOT)}: {line} ({e})")
    assert not wrong, wrong


def test_predict_examples_name_images_that_the_documented_step_writes(tmp_path):
    """README and use.md predict on `photos/` as `python tools/sample_images.py photos/` writes it: every file and
    glob they name exists there."""
    written = _tool("sample_images").write_samples(tmp_path / "photos")
    names = [f"photos/{path.name}" for path in written]
    parser, _ = build_parser()
    named = [
        (page.relative_to(ROOT), source)
        for page, _, argv in _documented_commands()
        if argv[0] == "predict"
        for source in parser.parse_args(argv).sources
    ]
    assert len(named) >= 3
    missing = [(page, s) for page, s in named if s != "photos/" and not fnmatch.filter(names, s)]
    assert not missing, f"not written by tools/sample_images.py: {missing}"
