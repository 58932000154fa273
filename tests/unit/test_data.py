"""Built-in datasets, the stratified hold-out, and the image transform."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.data import (
    DataInfo,
    ImageTransform,
    Preprocess,
    describe_augmentation,
    load_splits,
    num_workers,
    resolve_preprocess,
)
from trainer.data.splits import hold_out, labels_of
from trainer.data.transforms import resolve_augment


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


@pytest.mark.parametrize("seed", [0, 7])
def test_hold_out_takes_the_rows_of_datasets_train_test_split(seed):
    """Our hold-out reads the labels through Arrow; the rows and their order are exactly datasets' own split."""
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = datasets.Features(
        {"pixels": datasets.Sequence(datasets.Value("uint8")), "label": datasets.ClassLabel(10)}
    )
    full = datasets.Dataset.from_dict(
        {"pixels": digits.data.astype(np.uint8).tolist(), "label": digits.target.tolist()}, features=features
    )
    train, val = hold_out(full, 0.15, seed)
    expected = full.train_test_split(test_size=0.15, stratify_by_column="label", seed=seed)
    assert train["pixels"][:] == expected["train"]["pixels"][:] and val["pixels"][:] == expected["test"]["pixels"][:]
    assert labels_of(val).tolist() == expected["test"]["label"][:]
    rows = [*np.flatnonzero(digits.target == 0)[:10], np.flatnonzero(digits.target == 1)[0]]
    one_of_a_kind = full.select([int(r) for r in rows])  # a class with one image cannot give one to each side
    with pytest.raises(ValueError, match="only 1 member"):
        hold_out(one_of_a_kind, 0.5, seed)


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


def _in_force(transform, mixup) -> dict:
    """What timm's training transform really does: flip probability, crop area range, auto-augment, erasing."""
    found = {"hflip": 0.0, "auto_augment": False, "random_erase": 0.0}
    for t in transform.tf.transforms:
        name = type(t).__name__
        if name == "RandomHorizontalFlip":
            found["hflip"] = t.p
        elif name == "RandomResizedCropAndInterpolation":
            found["scale"] = tuple(t.scale)
        elif name in ("RandAugment", "AutoAugment", "AugMixAugment"):
            found["auto_augment"] = True
        elif name == "RandomErasing":
            found["random_erase"] = t.probability
    found["mixup"] = (mixup.mixup_alpha, mixup.cutmix_alpha) if mixup is not None else (0.0, 0.0)
    return found


@pytest.mark.parametrize(
    ("cfg", "source", "default_hflip", "line", "in_force"),
    [
        (  # the default run: digits, no flips, light crops at 32 px
            DataConfig(data="digits"),
            "builtin:digits",
            0.0,
            "augment: hflip 0 (default for builtin:digits), crop area 0.8-1 (default up to 64 px); "
            "off: auto-augment, mixup, cutmix, random erasing",
            {"hflip": 0.0, "scale": (0.8, 1.0), "auto_augment": False, "random_erase": 0.0, "mixup": (0.0, 0.0)},
        ),
        (  # a folder at 224 px with everything on
            DataConfig(imgsz=224, auto_augment="rand-m9-mstd0.5", mixup=0.8, cutmix=1.0, random_erase=0.25),
            "folder:pets",
            0.5,
            "augment: hflip 0.5 (default; --hflip 0 for digits/text), crop area 0.08-1 (default above 64 px), "
            "auto-augment rand-m9-mstd0.5, mixup 0.8, cutmix 1, random erasing 0.25",
            {"hflip": 0.5, "scale": (0.08, 1.0), "auto_augment": True, "random_erase": 0.25, "mixup": (0.8, 1.0)},
        ),
        (  # flags given: no "(default ...)" notes
            DataConfig(hflip=0.0, scale=(0.5, 1.0), mixup=0.2),
            "folder:scans",
            0.5,
            "augment: hflip 0, crop area 0.5-1, mixup 0.2; off: auto-augment, cutmix, random erasing",
            {"hflip": 0.0, "scale": (0.5, 1.0), "auto_augment": False, "random_erase": 0.0, "mixup": (0.2, 0.0)},
        ),
    ],
)
def test_header_line_states_the_augmentation_in_force(cfg, source, default_hflip, line, in_force):
    info = DataInfo(["a", "b"], 3, train_size=10, val_size=2, source=source, default_hflip=default_hflip)
    assert describe_augmentation(cfg, info) == line
    # The line describes the transform the run really builds.
    pre = Preprocess(cfg.imgsz, 3, (0.5,) * 3, (0.5,) * 3, "bilinear", 0.9)
    augment = resolve_augment(cfg, info, per_device_batch_size=8)
    assert _in_force(ImageTransform.training(pre, augment), augment.mixup) == in_force


def test_decode_turns_exif_rotated_photos_upright_as_datasets_does(tmp_path):
    """A photo stored sideways with EXIF orientation 6 decodes upright, exactly as HF datasets' Image feature decodes
    it (and as `trainer predict` classifies it)."""
    import datasets
    from PIL import Image

    from trainer.data import decode_image

    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored image
    Image.fromarray(pixels).save(tmp_path / "sideways.jpg", quality=95, exif=exif.tobytes())
    ours = decode_image({"bytes": None, "path": str(tmp_path / "sideways.jpg")})
    theirs = datasets.Image().decode_example({"bytes": None, "path": str(tmp_path / "sideways.jpg")})
    assert ours.size == theirs.size == (20, 40)  # width and height swapped: upright
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
