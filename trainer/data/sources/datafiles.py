"""Parquet, Arrow and WebDataset (.tar) files named by --data (`data_files`: a file, a folder of them, a glob or a
brace pattern; the split of each file from its name), and their loader (`load_files`). One loader for the three:
`datasets` reads each through its packaged module of that name; what WebDataset shards add (labels in a `.json`
member) is read by the standardisation after (`standard.standardize`). Streams (--streaming) read the same files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from trainer.config import UserError
from trainer.data.sources.shardcheck import check_shards
from trainer.data.sources.standard import TRAIN_SPLITS, VAL_SPLITS, Source

# What `trainer data convert` writes beside the shards: datasets' own DatasetInfo (features with the ClassLabel
# names, split sizes), read back here so tar shards keep their class names and streams know their length.
INFO_FILE = "dataset_info.json"


@dataclass(frozen=True)
class DataFiles:
    """Shard files named by --data, by split, and what reads them."""

    builder: str  # "parquet", "arrow" or "webdataset": the `datasets` packaged module
    by_split: dict[str, list[str]]
    root: Path  # where dataset_info.json may lie

    def info(self):
        """The `datasets.DatasetInfo` stored beside the shards (by `trainer data convert`), or None."""
        import datasets

        if not (self.root / INFO_FILE).is_file():
            return None
        return datasets.DatasetInfo.from_directory(str(self.root))

    def stamp(self) -> list:
        """Name, size and modification time of every file: what a cached copy of them must match."""
        return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for fs in self.by_split.values() for f in fs]


def data_files(spec: str) -> DataFiles | None:
    """Parquet, Arrow or WebDataset (.tar) files named by --data: a file, a folder holding them (not an image
    folder), a glob (`shards/train-*.tar`) or a brace pattern (`train-{000000..000009}.tar`, `{train,val}-*.tar`).
    None when --data names something else."""
    import glob

    path = Path(spec).expanduser()
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = _shard_files(path), path
        if not files:
            return None
    elif any(c in spec for c in "*?[{"):
        files = sorted({Path(f) for p in expand_braces(str(path)) for f in glob.glob(p, recursive=True)})
        if not files:
            raise UserError(f"--data {spec}: the pattern matches no files")
        root = Path(os.path.commonpath([str(f.parent) for f in files]))
    else:
        return None
    kinds = sorted({f.suffix for f in files})
    builders = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
    builder = builders.get(kinds[0]) if len(kinds) == 1 else None
    if builder is None:
        raise UserError(f"--data {spec}: expected .parquet, .arrow or .tar files (one kind), got {sorted(kinds)}")
    by_split: dict[str, list[str]] = {}
    for f in files:
        by_split.setdefault(_split_of(f, root), []).append(str(f))
    return DataFiles(builder, by_split, root)


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{train,val}` -> both (the WebDataset convention)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def _shard_files(path: Path) -> list[Path]:
    # One os.walk rather than pathlib's rglob: every image folder passes through here (10x faster at 100,000 files).
    # Tar shards lie at the top or one folder down: an image folder may hold an unrelated archive deeper.
    parquet, tars, arrow = [], [], []
    for dirpath, _, names in os.walk(path):
        depth = len(Path(dirpath).relative_to(path).parts)
        parquet += [Path(dirpath, n) for n in names if n.endswith(".parquet")]
        tars += [Path(dirpath, n) for n in names if n.endswith(".tar") and depth <= 1]
        arrow += [Path(dirpath, n) for n in names if n.endswith(".arrow") and not n.startswith("cache-")]
    return sorted(parquet) or sorted(tars) or sorted(arrow)


def _split_of(file: Path, root: Path) -> str:
    """`train-00000-of-00002.parquet`, `val.arrow`, `data/validation/0.parquet` -> their split; else train."""
    words = re.split(r"[-_./\\]", str(file.relative_to(root) if file != root else file.name).lower())
    for word in words:
        if word in TRAIN_SPLITS:
            return "train"
        if word in VAL_SPLITS:
            return word
    return "train"


def load_files(files: DataFiles, spec: str) -> Source:
    """The files' splits as `datasets` reads them (with the features stored beside them), each shard checked whole
    first; standardised after."""
    import datasets

    stored = files.info()
    check_shards(files.builder, files.by_split)  # a shard cut short: one line naming it, not a label-less sample
    try:
        loaded = datasets.load_dataset(
            files.builder, data_files=files.by_split, features=stored.features if stored else None
        )
    except Exception as e:  # pyarrow, tarfile and datasets raise many types for an unreadable file
        raise UserError(f"--data {spec}: cannot read the data files ({type(e).__name__}: {e})".split("\n")[0]) from e
    return Source(dict(loaded), [], f"{'webdataset' if files.builder == 'webdataset' else 'files'}:{spec}")
