"""A WebDataset tar or Parquet shard cut short (a copy that stopped, a full disk): one line naming the shard, with and
without --streaming, before any training (issue 19). datasets itself reads a cut tar silently, label-less."""

from __future__ import annotations

import tarfile

import datasets
import pytest
from test_sources import write_folder

from trainer.config import DataConfig, UserError
from trainer.data import load_splits
from trainer.data.convert import convert
from trainer.data.sources import stream_source
from trainer.data.sources.shardcheck import tar_samples


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.parametrize(("fmt", "suffix"), [("webdataset", "tar"), ("parquet", "parquet")])
def test_a_shard_cut_short_is_named_in_one_line(tmp_path, fmt, suffix):
    root = write_folder(tmp_path / "pets", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 2}})
    shards = tmp_path / "shards"
    convert(str(root), str(shards), fmt, "4")
    whole = load_splits(DataConfig(data=str(shards)))[1]
    assert whole.train_size == 12  # the shards read, before one is cut
    cut = shards / f"train-000001.{suffix}"
    cut.write_bytes(cut.read_bytes()[: _middle_of_the_last_file(cut)])
    expected = rf"^shard {cut} is truncated or damaged \(.+\); write it again \(trainer data convert\) or move it out"
    with pytest.raises(UserError, match=expected):
        load_splits(DataConfig(data=str(shards)))
    with pytest.raises(UserError, match=expected):
        stream_source(DataConfig(data=str(shards), streaming=True, workers=0))


def _middle_of_the_last_file(path) -> int:
    """Where a copy that stopped inside the last sample ends (a tar is padded with zeros to 10 KiB after it)."""
    if path.suffix != ".tar":
        return path.stat().st_size * 2 // 3
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + last.size // 2


def test_whole_tars_count_their_samples(tmp_path):
    root = write_folder(tmp_path / "pets", {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    convert(str(root), str(tmp_path / "shards"), "webdataset", "100")
    assert tar_samples(str(tmp_path / "shards" / "train-000000.tar")) == 5


def test_a_shard_that_breaks_mid_run_is_one_line(tmp_path):
    """What the readers raise on a shard damaged after the up-front check (tarfile's ReadError, pyarrow's
    ArrowInvalid and its OSError for Parquet), produced by really reading broken files, becomes one line; other
    errors stay bugs (their traceback is shown)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.run.faults import error_line

    (tmp_path / "bad.tar").write_bytes(b"\x01" * 700)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    (tmp_path / "bad.arrow").write_bytes(b"ARROW1" + b"\x00" * 64)

    def read_tar():
        with tarfile.open(tmp_path / "bad.tar") as tar:
            tar.getmembers()

    errors = []
    for read in (
        read_tar,
        lambda: pq.read_table(tmp_path / "bad.parquet"),
        lambda: pa.ipc.open_file(tmp_path / "bad.arrow"),
    ):
        with pytest.raises(Exception) as e:
            read()
        errors.append(e.value)
    assert [type(e).__name__ for e in errors] == ["ReadError", "OSError", "ArrowInvalid"]
    for e in errors:
        line = error_line(e)
        assert line.startswith(f"a data shard could not be read mid-run ({type(e).__name__}: "), line
        assert line.endswith("so it changed or its disk failed since: restore it, then run the command again"), line
    assert error_line(ValueError("a bug")) is None
    assert error_line(OSError("an errno-less OSError of something else")) is None
