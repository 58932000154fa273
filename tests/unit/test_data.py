"""Built-in datasets, the stratified hold-out, and the image transform."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.data import ImageTransform, Preprocess, load_splits, num_workers, resolve_preprocess


def _val_pixels(splits) -> np.ndarray:
    return np.stack([np.asarray(img) for img in splits["val"]["image"]])


@pytest.fixture(scope="module")
def digits():
    return load_splits(DataConfig(data="digits", val_fraction=0.1, split_seed=0))


def test_digits_split_is_stratified(digits):
    from sklearn.datasets import load_digits

    splits, info = digits
    totals = collections.Counter(load_digits().target.tolist())
    val = collections.Counter(splits["val"]["label"])
    train = collections.Counter(splits["train"]["label"])
    assert info.train_size + info.val_size == sum(totals.values())
    assert (info.channels, len(info.class_names), info.default_hflip) == (1, 10, 0.0)
    for label, total in totals.items():
        assert train[label] + val[label] == total
        assert abs(val[label] - 0.1 * total) <= 1, (label, val[label], total)


def test_split_depends_only_on_split_seed(digits):
    splits, _ = digits
    again, _ = load_splits(DataConfig(data="digits", split_seed=0))
    other, _ = load_splits(DataConfig(data="digits", split_seed=1))
    assert np.array_equal(_val_pixels(splits), _val_pixels(again))
    assert splits["val"]["label"] == again["val"]["label"]
    assert not np.array_equal(_val_pixels(splits), _val_pixels(other))


def _pre(in_chans: int, imgsz: int = 32) -> Preprocess:
    return Preprocess(imgsz, in_chans, (0.5,) * in_chans, (0.5,) * in_chans, "bilinear", 1.0)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_transform_grayscale_to_model_channels(train, in_chans):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    out = ImageTransform(_pre(in_chans, imgsz=24), train=train, hflip=0.0, scale=(0.6, 1.0))(
        {"image": [gray], "label": [3]}
    )
    (image,) = out["image"]
    assert out["label"] == [3]
    assert image.shape == (in_chans, 24, 24)
    assert image.dtype == torch.float32
    if in_chans == 3:  # grey replicated into RGB, normalised with equal statistics: identical channels
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_transform_normalises_with_mean_and_std():
    white = Image.new("L", (8, 8), 255)
    (image,) = ImageTransform(_pre(1), train=False, hflip=0.0, scale=(0.6, 1.0))({"image": [white], "label": [0]})[
        "image"
    ]
    torch.testing.assert_close(image, torch.ones(1, 32, 32))  # (1.0 - 0.5) / 0.5


def test_one_channel_preprocess_averages_rgb_statistics():
    import timm

    model = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    rgb_mean, rgb_std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    pre = resolve_preprocess(DataConfig(imgsz=40), model, in_chans=1)
    assert pre.imgsz == 40 and pre.in_chans == 1
    assert pre.mean == pytest.approx((sum(rgb_mean) / 3,))
    assert pre.std == pytest.approx((sum(rgb_std) / 3,))
    assert resolve_preprocess(DataConfig(), model, in_chans=3).mean == pytest.approx(tuple(rgb_mean))


def test_num_workers(monkeypatch):
    assert num_workers(DataConfig(workers=3), local_processes=8) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert num_workers(DataConfig(workers=-1), local_processes=2) == 7  # 8 cores per rank, one for training
    assert num_workers(DataConfig(workers=-1), local_processes=1) == 8  # capped
    assert num_workers(DataConfig(workers=-1), local_processes=8) == 0  # 2 cores per rank: no workers
