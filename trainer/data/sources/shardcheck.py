"""Whether local shard files are whole: a WebDataset tar cut short, a Parquet file without its footer. Checked before
the files are read (datasets reads a cut tar without a word, its last sample without a label), so the one-line error
names the shard. Cheap: a tar's last kilobyte and a Parquet file's footer (a tar's headers when its samples are
counted); no image is read. A shard damaged in its middle, or after the start of a run, is not caught here."""

from __future__ import annotations

import os

from trainer.config import UserError


def tar_samples(path: str) -> int:
    """Samples in a WebDataset tar (distinct keys: the name up to its first dot), from the headers only; UserError
    naming the file when it is cut short or not a tar."""
    import tarfile

    size = os.path.getsize(path)
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar if m.isfile()]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise _damaged(path, f"{type(e).__name__}: {e}") from e
    cut = next((m for m in members if m.offset_data + m.size > size), None)
    if cut is not None:
        raise _damaged(path, f"cut short inside {cut.name}: {size} of {cut.offset_data + cut.size} bytes")
    _check_tar_end(path, size)
    return len({m.name.split("/")[-1].split(".")[0] + m.name.rpartition("/")[0] for m in members})


def _check_tar_end(path: str, size: int) -> None:
    """Every tar writer ends the archive with two zero blocks; one cut short lacks them (one read: cheap per shard)."""
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        if size < 1024 or f.read() != bytes(1024):
            raise _damaged(path, "no end-of-archive marker: cut short")


def parquet_rows(path: str) -> int:
    """Rows of a Parquet file from its footer; UserError naming the file when the footer is missing or damaged."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise _damaged(path, f"{type(e).__name__}: {e}") from e


def check_shards(builder: str, by_split: dict[str, list[str]]) -> None:
    """Refuse (UserError, one line naming the shard) any local WebDataset or Parquet shard that is not whole."""
    check = {"webdataset": lambda p: _check_tar_end(p, os.path.getsize(p)), "parquet": parquet_rows}.get(builder)
    if check is None:
        return
    for files in by_split.values():
        for path in files:
            if os.path.isfile(path):  # local files only: a remote one is checked by what reads it
                check(path)


def _damaged(path: str, reason: str) -> UserError:
    return UserError(
        f"shard {path} is truncated or damaged ({reason.splitlines()[0]}); write it again (trainer data convert) or "
        "move it out of the data folder"
    )
