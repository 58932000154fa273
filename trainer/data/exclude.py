"""`--exclude FILE_LIST`: files left out of both splits after the source is split, e.g. the label issues that
`trainer data audit` found (its label_issues.csv) or any list a person made.

The list is one path per line (blank lines and `#` comments skipped) or a CSV whose header has a `file` (or `path`)
column. A path matches an image when it names the same file, as written or relative to the --data folder. The other
images keep their split, so a run with --exclude validates on the same images as one without, less those listed.
What was left out is recorded: config.yaml (`data.exclude`, `dataset.excluded_files`) and the data fingerprint (a
digest of the files removed), so `--resume` notices a changed list.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from trainer.config import DataConfig, UserError


def read_file_list(path: str) -> list[str]:
    """The paths a list names, in its order."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise UserError(
            f"--exclude {path}: no such file; give a list of files (one per line, or a CSV with a file column)"
        ) from None
    except OSError as e:
        raise UserError(f"--exclude {path}: cannot read it ({e.strerror})") from None
    lines = text.splitlines()
    header = next(csv.reader(lines[:1]), [])
    column = next((name for name in ("file", "path") if name in header), None)
    if column is not None:
        return [row[column] for row in csv.DictReader(lines) if row.get(column)]
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def image_paths(dataset) -> list[str] | None:
    """The image paths of a map-style split, in its order; None when its images are stored bytes without paths."""
    column = dataset.with_format("arrow")["image"].combine_chunks()
    if not hasattr(column, "field"):
        return None
    paths = column.field("path")
    if paths.null_count == len(paths):
        return None
    return [p or "" for p in paths.to_pylist()]


def exclude_files(splits: dict, cfg: DataConfig) -> tuple[dict, tuple[str, ...]]:
    """`splits` without the files `cfg.exclude` lists, and the paths removed (sorted). UserError when the images have
    no paths, or when the list names none of them."""
    listed = read_file_list(cfg.exclude)
    root = Path(cfg.data).expanduser()
    wanted = {os.path.realpath(p) for p in listed} | {os.path.realpath(root / p) for p in listed} | set(listed)
    kept, removed = {}, []
    for name, dataset in splits.items():
        paths = image_paths(dataset)
        if paths is None:
            raise UserError(
                f"--exclude {cfg.exclude}: the images of --data {cfg.data} are stored without file names to match; "
                "exclude files from image folders (or data that keeps each image's path)"
            )
        drop = [i for i, p in enumerate(paths) if p in wanted or os.path.realpath(p) in wanted]
        removed += [paths[i] for i in drop]
        kept[name] = dataset.select(sorted(set(range(len(paths))) - set(drop))) if drop else dataset
    if listed and not removed:
        raise UserError(
            f"--exclude {cfg.exclude}: none of its {len(listed)} files is an image of --data {cfg.data} (paths match "
            "as written or relative to the data folder); check the list and --data"
        )
    return kept, tuple(sorted(removed))


def describe_exclusion(cfg: DataConfig, before: dict, after: dict) -> str:
    """What --exclude left out, per split, in words (printed and recorded in config.yaml)."""
    counts = ", ".join(f"{len(before[s]) - len(after[s])} from {s}" for s in before)
    return f"--exclude {cfg.exclude}: listed files left out ({counts})"
