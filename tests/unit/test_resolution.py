"""Progressive resizing: the size of each epoch (a pure function of it), and every loader kind following it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trainer import data
from trainer.config import DataConfig
from trainer.data.resolution import SizeSchedule, size_schedule, size_step
from trainer.data.transforms import Preprocess

PRE = Preprocess(32, 1, (0.5,), (0.5,), "bilinear", 1.0)


def test_the_ramp_gives_each_epoch_its_size():
    assert SizeSchedule(16, 32, (2, 4), 8).sizes(5) == [16, 16, 24, 32, 32]
    # FFCV's ResNet-50 ramp: 160 -> 192 in steps of 32 between two epochs, then the last epochs at full size.
    assert SizeSchedule(160, 224, (2, 4), 32).sizes(6) == [160, 160, 192, 224, 224, 224]
    assert SizeSchedule(128, 224, (1, 5), 32).sizes(5) == [128, 160, 192, 192, 224]  # rounded to the nearest step
    assert SizeSchedule(16, 32, (3, 3), 8).sizes(4) == [16, 16, 32, 32]  # A == B: a jump at B
    # Defaults: START_PX up to 40 % of the epochs, full size from 80 %; one epoch trains at full size.
    assert DataConfig(progressive=16).ramp_epochs(5) == (2, 4)
    assert DataConfig(progressive=16).ramp_epochs(88) == (35, 70)
    assert DataConfig(progressive=16).ramp_epochs(1) == (1, 1)
    assert size_schedule(DataConfig(progressive=16), 5).sizes(5) == [16, 16, 24, 32, 32]
    assert size_schedule(DataConfig(), 5) is None
    assert size_schedule(DataConfig(progressive=16, progressive_ramp=(1, 5)), 5).sizes(5) == [16, 24, 24, 32, 32]
    # Steps: a ViT's patch; CNNs 32 px at ImageNet sizes, less at small ones.
    assert [size_step(px) for px in (16, 32, 64, 100, 128, 224)] == [4, 8, 16, 16, 32, 32]
    assert size_step(224, patch_size=16) == 16 and size_step(32, patch_size=16) == 16
    text = SizeSchedule(16, 32, (2, 4), 8).describe(5)
    assert text.startswith("progressive resizing: 16 px (epochs 1-2), 24 px (epoch 3), 32 px (epochs 4-5)")
    assert "batch size unchanged" in text


def _first_batch(loader, epoch: int):
    loader.set_epoch(epoch)
    return next(iter(loader))


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loaders_follow_the_schedule_and_draw_the_same_crops_at_full_size(backend):
    """The torch transform or the DALI stage sees each epoch's size; at full size the batches equal those of
    a run without --progressive (the crops and flips do not depend on the size); validation at --test-imgsz. (Worker
    processes, which read the size from shared memory, are exercised by tests/e2e/test_progressive.py.)"""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = DataConfig(data="digits", imgsz=32, progressive=16, progressive_ramp=(1, 3), test_imgsz=40, workers=0)
    dataset = data.Data(*data.load_splits(cfg))
    spec = data.loader_spec(cfg, data.Backend(backend, "test"), PRE)
    schedule = size_schedule(cfg, 3)
    train, val = data.build_loaders(None, dataset, cfg, spec, 32, schedule)
    fixed, _ = data.build_loaders(None, dataset, replace(cfg, progressive=0, progressive_ramp=()), spec, 32)
    sizes = []
    for epoch in (1, 2, 3, 1):  # unsharded loaders reshuffle from their generators: both read the same epochs
        ours, theirs = _first_batch(train, epoch), _first_batch(fixed, epoch)
        sizes.append(ours.images.shape[-1])
        assert torch.equal(ours.labels, theirs.labels) and theirs.images.shape[-1] == 32
        if epoch == 3:
            assert torch.equal(ours.images, theirs.images)
    assert sizes == [16, 24, 32, 16] and train.imgsz == 16
    assert next(iter(val)).images.shape[-2:] == (40, 40)


def test_a_stream_follows_the_schedule():
    cfg = DataConfig(data="digits", imgsz=32, progressive=16, progressive_ramp=(1, 2), workers=0)
    splits, info = data.load_splits(cfg)
    stream = splits["train"].to_iterable_dataset(num_shards=2)
    spec = data.loader_spec(cfg, data.Backend("torch", "test"), PRE)
    train, _ = data.build_loaders(
        None, data.Data({**splits, "train": stream}, info), cfg, spec, 32, size_schedule(cfg, 2)
    )
    assert [_first_batch(train, epoch).images.shape[-1] for epoch in (1, 2)] == [16, 32]
