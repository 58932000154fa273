"""Shards and streams: WebDataset/Parquet shards read back, `trainer data convert`, equal batches per rank, skips."""

from __future__ import annotations

import functools
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.cli import main
from trainer.config import DataConfig, UserError
from trainer.data import load_splits
from trainer.data.convert import convert, parse_shard_size
from trainer.data.samples import EpochStream
from trainer.data.sources.datafiles import expand_braces
from trainer.data.transforms import ImageTransform, Preprocess

PRE = Preprocess(8, 1, (0.5,), (0.5,), "bilinear", 1.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """300 of scikit-learn's digits as PNGs: train/ (240) and val/ (every 5th), one folder per class."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("folder")
    digits = load_digits()
    for i in range(300):
        sub = root / ("val" if i % 5 == 0 else "train") / f"digit_{digits.target[i]}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(sub / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def wds(folder, tmp_path_factory) -> Path:
    """The folder as WebDataset shards of 100 samples: train 100 + 100 + 40, val 60."""
    out = tmp_path_factory.mktemp("wds") / "shards"
    assert convert(str(folder), str(out), "webdataset", "100") == {"train": 240, "val": 60}
    return out


def test_brace_patterns_and_shard_sizes():
    assert expand_braces("a/train-{000..002}.tar") == ["a/train-000.tar", "a/train-001.tar", "a/train-002.tar"]
    assert expand_braces("{train,val}-{0..1}.tar") == ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]
    assert parse_shard_size("10000") == (10000, 0) and parse_shard_size("512MB") == (0, 512 * 2**20)
    with pytest.raises(UserError, match="--shard-size expects"):
        parse_shard_size("lots")


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_convert_round_trip_keeps_classes_counts_and_images(folder, tmp_path, capsys, fmt):
    out = tmp_path / "shards"
    assert main(["data", "convert", str(folder), str(out), "--format", fmt, "--shard-size", "100"]) == 0
    assert f"wrote {fmt} shards to {out} (train 240, val 60 samples)" in capsys.readouterr().out
    ext = "tar" if fmt == "webdataset" else "parquet"
    assert sorted(p.name for p in out.glob(f"*.{ext}")) == [f"train-00000{i}.{ext}" for i in range(3)] + [
        f"val-000000.{ext}"
    ]
    before, info_before = load_splits(DataConfig(data=str(folder)))
    after, info = load_splits(DataConfig(data=str(out)))
    assert info.class_names == info_before.class_names  # names, not indices, from dataset_info.json / the schema
    assert (info.train_size, info.val_size, info.channels) == (240, 60, 1)
    assert sorted(after["train"]["label"]) == sorted(before["train"]["label"])
    # The stored bytes are the files' bytes: not re-encoded.
    first = next((folder / "train").rglob("*.png")).read_bytes()
    assert any(v["bytes"] == first for v in after["train"]["image"])
    # A glob or brace pattern over the shards names the same data (train only here: val is held out).
    pattern, _ = load_splits(DataConfig(data=str(out / f"train-{{000000..000002}}.{ext}")))
    assert len(pattern["train"]) + len(pattern["val"]) == 240


def test_convert_refuses_an_existing_destination_and_bad_input(folder, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["data", "convert", str(folder), str(dst)]) == 2
    assert main(["data", "convert", str(tmp_path / "nothing"), str(tmp_path / "new")]) == 2
    assert main(["data", "convert", str(folder), str(tmp_path / "new"), "--shard-size", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("trainer: error: ") for line in lines), lines
    assert "taken exists and is not an empty folder" in lines[0] and "no such file or folder" in lines[1]
    assert (dst / "keep.txt").read_text() == "mine" and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary folder left behind


@functools.cache
def _streamed(data: str):
    return load_splits(DataConfig(data=data, streaming=True))


def _stream_batches(data: str, rank: int, world: int, batch_size: int, epoch: int = 1, buffer: int = 50):
    """What one rank's EpochStream yields for one epoch, built as build_stream_loaders builds it."""
    from datasets.distributed import split_dataset_by_node

    splits, info = _streamed(data)
    stream = split_dataset_by_node(splits["train"].shuffle(seed=0, buffer_size=buffer), rank, world)
    steps = info.train_size // (world * batch_size)
    epochs = EpochStream(stream, ImageTransform(PRE, True, 0.0, (0.5, 1.0)), batch_size, steps, seed=0, rank=rank)
    epochs.set_epoch(epoch)
    return list(epochs), epochs, splits


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_same_batch_count_over_uneven_shards(wds, world):
    """3 shards of 100, 100 and 40 samples: accelerate's split of a stream (`shard(world, rank)`) gives 2 ranks 200
    and 40 samples; here every rank runs floor(240 / (world x 16)) full batches of its own samples."""
    splits, _ = _streamed(str(wds))
    assert [len(list(splits["train"].shard(num_shards=2, index=r))) for r in range(2)] == [200, 40]
    labels = []
    for rank in range(world):
        batches, _, _ = _stream_batches(str(wds), rank, world, 16)
        assert len(batches) == 240 // (world * 16)
        assert all(b.images.shape == (16, 1, 8, 8) and len(b.labels) == 16 for b in batches)
        labels.append(torch.cat([b.labels for b in batches]))
    assert len({len(x) for x in labels}) == 1


def test_a_streamed_sample_is_augmented_the_same_on_any_rank_and_in_any_batch(wds):
    """Flips and crops keyed by the sample (a digest of its bytes): every image 2 ranks make in an epoch (each reads 112
    of its 120 samples, in batches of 16) is one that 1 process makes of the same sample in that epoch."""
    transform = ImageTransform(PRE, True, 0.5, (0.3, 1.0))

    def images(rank: int, world: int, batch_size: int) -> set[bytes]:
        _, epochs, _ = _stream_batches(str(wds), rank, world, batch_size, epoch=2)
        epochs.transform = transform
        return {image.numpy().tobytes() for batch in epochs for image in batch.images}

    alone = images(0, 1, 16)
    assert len(alone) == 240  # every sample once, each augmented differently
    two = images(0, 2, 16) | images(1, 2, 16)
    assert len(two) == 2 * 112 and two <= alone  # the same pixels as alone


def test_a_short_rank_reads_its_stream_again_and_epochs_repeat_exactly(wds):
    # --train-samples beyond the data: every rank cycles its part (reshuffled) to reach its batch count.
    from datasets.distributed import split_dataset_by_node

    splits, info = load_splits(DataConfig(data=str(wds), streaming=True, train_samples=1000))
    assert info.train_size == 1000
    stream = split_dataset_by_node(splits["train"].shuffle(seed=0, buffer_size=50), 1, 2)
    epochs = EpochStream(stream, ImageTransform(PRE, False), 20, 1000 // 40, seed=0, rank=1)
    epochs.set_epoch(1)
    first = list(epochs)
    assert len(first) == 25  # 500 samples from a part of 120
    again = list(epochs)  # the same epoch read again, as after a restart at its start: the same batches, bit for bit
    assert all(
        torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(first, again, strict=True)
    )
    epochs.set_epoch(2)
    assert not torch.equal(torch.cat([b.labels for b in first]), torch.cat([b.labels for b in epochs]))


def test_parquet_shards_stream_with_counts_from_the_footers(folder, tmp_path):
    out = tmp_path / "pq"
    convert(str(folder), str(out), "parquet", "100")
    (out / "dataset_info.json").unlink()  # the footers alone give the count
    batches, _, splits = _stream_batches(str(out), 0, 2, 16)
    assert len(batches) == 240 // 32 and len(splits["val"]) == 60


def _tar_with_a_broken_image(folder: Path, path: Path) -> None:
    images = sorted((folder / "train").rglob("*.png"))[:40]
    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(images):
            data = b"\x89PNG garbage" if i == 0 else image.read_bytes()
            for name, payload in ((f"{i:04d}.png", data), (f"{i:04d}.cls", str(i % 2).encode())):
                member = tarfile.TarInfo(name)
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))


def test_a_corrupt_sample_inside_a_shard_is_skipped_and_counted(folder, tmp_path, capsys):
    root = tmp_path / "broken"
    root.mkdir()
    _tar_with_a_broken_image(folder, root / "train-0.tar")
    _tar_with_a_broken_image(folder, root / "val-0.tar")
    (root / "dataset_info.json").write_text(
        '{"features": {"png": {"_type": "Image"}, "cls": {"names": ["a", "b"], "_type": "ClassLabel"}, '
        '"__key__": {"dtype": "string", "_type": "Value"}, "__url__": {"dtype": "string", "_type": "Value"}}}'
    )
    # 40 samples (the count from the tar headers): 3 batches of 13, in file order (buffer 1), the broken one first.
    batches, epochs, _ = _stream_batches(str(root), 0, 1, 13, buffer=1)
    assert len(batches) == 3 and all(len(b.labels) == 13 for b in batches)
    assert epochs.policy.replaced == 1
    err = capsys.readouterr().err
    assert err.count("warning: skipped unreadable image 0000.png") == 1 and "1 skipped on rank 0 so far" in err
    # Without --streaming the shards become a map-style dataset: the broken sample is replaced when read, as in folders.
    from trainer.data.samples import Replacing

    splits, info = load_splits(DataConfig(data=str(root)))
    assert (info.train_size, info.val_size) == (40, 40)
    train = Replacing(splits["train"].with_transform(ImageTransform(PRE, False)))
    assert len([train[i] for i in range(len(train))]) == len(train)
    assert "skipped unreadable image 0000.png" in capsys.readouterr().err
