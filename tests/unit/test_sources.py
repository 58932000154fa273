"""Every kind of `--data` source on small generated data: folders, save_to_disk, Parquet, Arrow, hub ids."""

from __future__ import annotations

import collections
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DataConfig, UserError
from trainer.data import ImageTransform, Preprocess, load_splits

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Formats that store each mode (WebP has no grayscale, JPEG no alpha or palette).
FORMATS_OF = {"RGB": FORMATS, "L": ("JPEG", "PNG", "BMP"), "RGBA": ("PNG", "WEBP"), "P": ("PNG", "BMP")}
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}


@pytest.fixture(autouse=True)
def _offline_cache(monkeypatch, tmp_path):
    """HF datasets caches into the test's folder, and the hub is unreachable as under `trainer train`."""
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def picture(value: int, mode: str = "RGB", size: int = 12) -> Image.Image:
    rgb = Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))
    return rgb.convert(mode) if mode != "RGB" else rgb


def write_folder(root: Path, layout: dict[str, dict[str, int]], mode: str = "RGB") -> Path:
    """layout {split_dir: {class: count}}; images cycle through the formats that store `mode` ("": no split level)."""
    for split, classes in layout.items():
        for c, (name, count) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                fmt = FORMATS_OF[mode][i % len(FORMATS_OF[mode])]
                picture(40 * c + i, mode).save(folder / f"{i}{SUFFIX[fmt]}", format=fmt)
    return root


def _pre(in_chans: int) -> Preprocess:
    return Preprocess(16, in_chans, (0.5,) * in_chans, (0.5,) * in_chans, "bilinear", 1.0)


def test_image_folder_with_val_split_and_every_format(tmp_path):
    root = write_folder(tmp_path / "pets", {"train": {"dog": 4, "cat": 4}, "valid": {"cat": 2, "dog": 1}})
    (root / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    splits, info = load_splits(DataConfig(data=str(root)))
    assert info.class_names == ["cat", "dog"]  # sorted, as torchvision's ImageFolder numbers them
    assert (info.train_size, info.val_size, info.val_split, info.channels) == (8, 3, "split valid", 3)
    assert info.source == f"folder:{root}" and info.skipped == ()
    assert sorted(splits["val"]["label"]) == [0, 0, 1]
    out = ImageTransform(_pre(3), train=False)(splits["train"][:8])
    assert {tuple(t.shape) for t in out["image"]} == {(3, 16, 16)}


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_and_palette_images_become_model_channels(tmp_path, mode):
    root = write_folder(tmp_path / "d", {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}}, mode=mode)
    splits, info = load_splits(DataConfig(data=str(root)))
    assert info.channels == (1 if mode == "L" else 3)
    for in_chans in (1, 3):
        images = ImageTransform(_pre(in_chans), train=True)(splits["train"][:8])["image"]
        assert {tuple(t.shape) for t in images} == {(in_chans, 16, 16)}


def test_class_folders_without_splits_are_held_out_stratified(tmp_path):
    root = write_folder(tmp_path / "flat", {"": {"a": 10, "b": 20}})
    cfg = DataConfig(data=str(root), val_fraction=0.2, split_seed=3)
    splits, info = load_splits(cfg)
    assert collections.Counter(splits["val"]["label"]) == {0: 2, 1: 4}
    assert info.val_split == "0.2 of train held out, stratified, --split-seed 3"
    again, _ = load_splits(cfg)
    assert again["val"]["image"] == splits["val"]["image"]  # same files on every rank and every run


def _table(n: int = 12, image_key: str = "img", label_key: str = "fine_label", string_labels: bool = False):
    labels = [["x", "y", "z"][i % 3] if string_labels else i % 3 for i in range(n)]
    label_feature = datasets.Value("string") if string_labels else datasets.ClassLabel(names=["x", "y", "z"])
    features = datasets.Features({image_key: datasets.Image(), label_key: label_feature, "id": datasets.Value("int64")})
    data = {image_key: [picture(20 * i % 256) for i in range(n)], label_key: labels, "id": list(range(n))}
    return datasets.Dataset.from_dict(data, features=features)


def test_save_to_disk_dataset_dict_with_odd_column_names(tmp_path):
    datasets.DatasetDict({"train": _table(12), "test": _table(6)}).save_to_disk(tmp_path / "saved")
    splits, info = load_splits(DataConfig(data=str(tmp_path / "saved")))
    assert info.class_names == ["x", "y", "z"]
    assert (info.train_size, info.val_size, info.val_split) == (12, 6, "split test")
    assert splits["train"].column_names == ["image", "label"]
    (image,) = ImageTransform(_pre(3), train=False)(splits["val"][:1])["image"]
    assert image.shape == (3, 16, 16)


def test_save_to_disk_single_dataset_found_by_feature_type_with_string_labels(tmp_path):
    _table(15, image_key="photo", label_key="species", string_labels=True).save_to_disk(tmp_path / "one")
    with pytest.raises(UserError, match=r"which column holds the labels .*--label-column"):
        load_splits(DataConfig(data=str(tmp_path / "one")))  # a string column is no ClassLabel: must be named
    splits, info = load_splits(DataConfig(data=str(tmp_path / "one"), label_column="species", val_fraction=0.2))
    assert info.class_names == ["x", "y", "z"]
    assert collections.Counter(splits["val"]["label"]) == {0: 1, 1: 1, 2: 1}
    with pytest.raises(UserError, match=r"--image-column 'pic' is not a column; columns: photo, species, id"):
        load_splits(DataConfig(data=str(tmp_path / "one"), image_column="pic"))


def test_parquet_folder_with_split_named_files(tmp_path):
    folder = tmp_path / "pq" / "data"
    folder.mkdir(parents=True)
    _table(12, string_labels=True, label_key="label").to_parquet(folder / "train-00000-of-00001.parquet")
    _table(6, string_labels=True, label_key="label").to_parquet(folder / "validation-00000-of-00001.parquet")
    splits, info = load_splits(DataConfig(data=str(tmp_path / "pq")))
    assert (info.train_size, info.val_size, info.class_names) == (12, 6, ["x", "y", "z"])
    assert info.val_split == "split validation"
    (image,) = ImageTransform(_pre(3), train=True)(splits["train"][:1])["image"]
    assert image.shape == (3, 16, 16)


def test_arrow_file_and_unknown_validation_label(tmp_path):
    train = _table(12, string_labels=True)
    train.save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    _, info = load_splits(DataConfig(data=str(arrow), label_column="fine_label", val_fraction=0.25))
    assert (info.train_size + info.val_size, info.class_names) == (12, ["x", "y", "z"])

    odd = train.map(lambda e: {"fine_label": "w"})  # a validation class that training never saw
    datasets.DatasetDict({"train": train, "val": odd}).save_to_disk(tmp_path / "odd")
    with pytest.raises(UserError, match=r"split 'val' has label\(s\) w that training lacks"):
        load_splits(DataConfig(data=str(tmp_path / "odd"), label_column="fine_label"))


def test_hub_id_not_in_cache_while_offline():
    with pytest.raises(
        UserError, match=r"--data someone/photos: not a built-in name \(mnist, digits\), a path, .* --allow-download"
    ):
        load_splits(DataConfig(data="someone/photos"))
    with pytest.raises(UserError, match=r"--data ./missing: no such file or folder"):
        load_splits(DataConfig(data="./missing"))


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({"train": {"a": 2, "b": 0}}, r"class folder train/b/ has no images"),
        ({"train": {"a": 2, "b": 2}, "val": {"a": 1, "c": 1}}, r"val/ has class folder\(s\) c that train/ lacks"),
        ({"train": {"a": 3}, "val": {"a": 1}}, r"only one class \(a\)"),
        ({"val": {"a": 1, "b": 1}}, r"found val/ but no train/ folder"),
        ({}, r"no images found"),
    ],
)
def test_bad_folders_are_refused(tmp_path, layout, expected):
    root = write_folder(tmp_path / "bad", layout)
    root.mkdir(exist_ok=True)
    with pytest.raises(UserError, match=expected):
        load_splits(DataConfig(data=str(root)))


def write_broken_files(folder: Path) -> list[Path]:
    """A zero-byte file, a truncated JPEG and a text file named .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    empty, truncated, text = folder / "empty.jpg", folder / "truncated.jpg", folder / "text.jpg"
    empty.write_bytes(b"")
    picture(90, size=64).save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    text.write_text("this is not an image\n")
    return [empty, truncated, text]


def test_unreadable_files_are_skipped_counted_and_named(tmp_path):
    root = write_folder(tmp_path / "d", {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}})
    # A JPEG with data after its end marker (as some cameras write) is readable and must be kept.
    trailing = root / "train" / "a" / "trailing.jpg"
    picture(10).save(trailing, format="JPEG")
    trailing.write_bytes(trailing.read_bytes() + b"\x00" * 100 + b"camera maker notes")
    broken = [*write_broken_files(root / "train" / "b"), root / "val" / "a" / "empty.png"]
    broken[-1].write_bytes(b"")
    _, info = load_splits(DataConfig(data=str(root)))
    assert info.train_size == 13 and info.val_size == 4
    reasons = dict(info.skipped)
    assert sorted(reasons) == sorted(str(p) for p in broken)
    assert reasons[str(root / "train" / "b" / "empty.jpg")] == "empty file"
    assert reasons[str(root / "train" / "b" / "text.jpg")] == "not an image"
    assert "truncated" in reasons[str(root / "train" / "b" / "truncated.jpg")].lower()

    from trainer.data import unreadable_warning

    warning = unreadable_warning(info)
    assert warning.startswith("warning: skipped 4 unreadable image file(s): ") and warning.endswith(" ...")


def test_file_broken_mid_run_is_replaced_and_batches_keep_their_size(tmp_path, capsys):
    from trainer import data

    root = write_folder(tmp_path / "d", {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})
    cfg = DataConfig(data=str(root), workers=0, imgsz=16)
    splits, info = load_splits(cfg)
    victim = Path(splits["train"][0]["image"]["path"])
    victim.write_bytes(b"")  # the disk changed after the up-front check
    spec = data.loader_spec(cfg, data.Backend("torch", "test"), _pre(3))
    train, _ = data.build_loaders(None, data.Data(splits, info), cfg, spec, 4)
    shapes = [tuple(batch.images.shape) for _ in range(2) for batch in train]
    assert shapes == [(4, 3, 16, 16)] * 8
    err = capsys.readouterr().err
    assert err.count("skipped unreadable image") == 1 and str(victim) in err


def test_mixup_targets_with_loss_smoothing_equal_timm_soft_target_loss():
    """Mixing in the loader with F.cross_entropy's smoothing == timm's Mixup(label_smoothing) + SoftTargetCE."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    logits = torch.randn(8, 5)
    for mixup_alpha, cutmix_alpha in ((0.4, 0.0), (0.0, 1.0), (0.8, 1.0)):
        np.random.seed(0)
        _, ours = Mixup(mixup_alpha, cutmix_alpha, label_smoothing=0.0, num_classes=5)(images.clone(), labels)
        np.random.seed(0)
        _, timms = Mixup(mixup_alpha, cutmix_alpha, label_smoothing=0.1, num_classes=5)(images.clone(), labels)
        assert not torch.equal(ours, torch.nn.functional.one_hot(labels, 5).float())  # really mixed
        torch.testing.assert_close(
            torch.nn.functional.cross_entropy(logits, ours, label_smoothing=0.1),
            SoftTargetCrossEntropy()(logits, timms),
        )


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({"train": {"a": 2, "b": 0}}, "class folder train/b/ has no images"),
        ({"train": {"a": 2, "b": 2}, "val": {"a": 1, "zebra": 1}}, "val/ has class folder(s) zebra that train/ lacks"),
        ({"train": {"a": 3}}, "only one class (a)"),
        ({"train": {}}, "no images found"),
    ],
)
def test_bad_data_exits_2_with_one_line_and_writes_nothing(
    tmp_path, monkeypatch, capsys, fresh_accelerate_state, layout, expected
):
    from trainer.cli import main

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "bad", layout)
    (tmp_path / "bad").mkdir(exist_ok=True)
    assert main(["train", "--data", "bad", "--tracker", "none", "--epochs", "1"]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("trainer: error: --data bad: ") and expected in err, err
    assert not (tmp_path / "runs").exists()


def test_builtin_set_is_cached_as_arrow_and_rebuilt_when_damaged(monkeypatch, tmp_path):
    from trainer.data.sources import builtin

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    built = builtin.load_builtin("mnist")
    copies = list((tmp_path / "cache" / "trainer-builtin").iterdir())
    assert [p.name.split("-")[0] for p in copies] == ["mnist"]  # complete copy only, no temporary folder left
    cached = builtin.load_builtin("mnist")
    assert cached.splits["train"]["image"] == built.splits["train"]["image"]  # the same PNG bytes
    assert cached.splits["train"]["label"] == built.splits["train"]["label"] and cached.class_names == built.class_names
    (copies[0] / "state.json").write_text("{")  # torn copy: rebuilt, not an error
    again = builtin.load_builtin("mnist")
    assert again.splits["train"]["label"] == built.splits["train"]["label"]
    assert datasets.load_from_disk(str(copies[0]))["label"] == built.splits["train"]["label"]  # replaced
