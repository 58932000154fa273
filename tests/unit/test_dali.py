"""The DALI input path on the CPU (DALI's CPU operators): the same pixels and labels as the torch path on the same
crop windows, the same batches from the same seed whatever DALI's thread count, a file DALI rejects mid-run replaced
by its neighbour and reported once, and the loader choice of --loader auto|torch|dali."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import data
from trainer.config import DataConfig, UserError
from trainer.data import dali
from trainer.data.transforms import Preprocess

pytest.importorskip("nvidia.dali")

RGB = Preprocess(32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)


def _photo(rng, k: int) -> np.ndarray:
    y, x = np.mgrid[0:90, 0:120].astype(np.float32)
    planes = [np.sin(x / (7 + k)) * 80 + 128, np.cos(y / 9) * 80 + 128, x + y]
    return np.clip(np.stack(planes, -1) + rng.normal(0, 8, (90, 120, 3)), 0, 255).astype(np.uint8)


def _mixed_folder(root: Path, count: int = 32) -> Path:
    """Two classes; every kind of file the torch path reads: JPEG (RGB, gray, CMYK, rotated by EXIF), PNG (RGBA,
    palette, 16-bit), WebP, BMP."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(_photo(rng, i % 2))
        kind = i % 8
        if kind == 0 and i % 16 == 8:  # a phone photo stored sideways (EXIF orientation 6): both paths turn it
            exif = Image.Exif()
            exif[0x0112] = 6
            img.save(folder / f"{i}.jpg", quality=90, exif=exif.tobytes())
        elif kind in (0, 3, 5):
            {0: img, 3: img.convert("CMYK"), 5: img.convert("L")}[kind].save(folder / f"{i}.jpg", quality=90)
        elif kind in (1, 2):
            img.convert("RGBA" if kind == 1 else "P").save(folder / f"{i}.png")
        elif kind == 4:
            Image.fromarray(np.asarray(img)[..., 0].astype(np.uint16) * 200).save(folder / f"{i}.png")
        else:
            img.save(folder / f"{i}.{'webp' if kind == 6 else 'bmp'}")
    return root


def _loaders(cfg: DataConfig, pre: Preprocess, loader: str, batch: int = 8):
    dataset = data.Data(*data.load_splits(cfg))
    spec = data.loader_spec(cfg, data.Backend(loader, "test"), pre)
    train, val = data.build_loaders(None, dataset, cfg, spec, batch)
    train.set_epoch(1)
    return train, val


def _mean_abs_diff(a: torch.Tensor, b: torch.Tensor, std) -> float:
    """Mean |difference| in 0..1 pixel units (undoing the normalisation)."""
    return ((a - b).abs() * torch.tensor(std).view(1, -1, 1, 1)).mean().item()


@pytest.mark.parametrize("kind", ["mixed-formats", "grayscale-digits"])
def test_dali_cpu_matches_torch_path_on_the_same_windows(tmp_path: Path, kind: str):
    if kind == "mixed-formats":
        cfg, pre = DataConfig(data=str(_mixed_folder(tmp_path)), imgsz=32, workers=0, hflip=0.5, scale=(0.3, 1)), RGB
    else:  # PNG bytes in an Arrow table, one channel
        cfg, pre = DataConfig(data="digits", imgsz=16, workers=0), Preprocess(16, 1, (0.5,), (0.25,), "bilinear", 1.0)
    torch_train, torch_val = _loaders(cfg, pre, "torch")
    dali_train, dali_val = _loaders(cfg, pre, "dali")
    for a, b in zip(list(torch_train)[:6], list(dali_train)[:6], strict=True):
        assert a.images.shape == b.images.shape == (8, pre.in_chans, pre.imgsz, pre.imgsz)
        assert torch.equal(a.labels, b.labels)
        assert _mean_abs_diff(a.images, b.images, pre.std) <= 0.5 / 255
    for a, b in zip(torch_val, dali_val, strict=True):  # resize the shorter side, centre crop
        assert torch.equal(a.labels, b.labels)
        assert _mean_abs_diff(a.images, b.images, pre.std) <= 0.5 / 255


def test_same_seed_same_batches_across_runs_and_dali_threads(tmp_path: Path):
    """With random erasing and mixup/cutmix on the decoded batch: the samples' seeds and the batch's decide them."""
    cfg = DataConfig(data=str(_mixed_folder(tmp_path, 16)), imgsz=32, workers=0, random_erase=0.5, mixup=0.2, cutmix=1)
    runs = []
    for threads in (1, 1, 2):
        train, _ = _loaders(cfg, RGB, "dali")
        train.stage.spec = dataclasses.replace(train.stage.spec, threads=threads)
        runs.append(list(train))
    assert runs[0][0].labels.dim() == 2  # mixed targets: class probabilities
    train.set_epoch(2)
    assert not torch.equal(next(iter(train)).images, runs[0][0].images)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def _broken_png(good: Path) -> bytes:
    """A PNG whose header and IEND end pass the up-front check, with its compressed data zeroed (a CRC error)."""
    data = good.read_bytes()
    at = data.index(b"IDAT") + 40
    return data[:at] + bytes(200) + data[at + 200 :]


@pytest.mark.parametrize("where", ["in the workers", "inside DALI"])
def test_unreadable_file_is_replaced_by_its_neighbour_and_reported_once(tmp_path: Path, capfd, monkeypatch, where):
    """A JPEG whose headers are cut (DALI would stop on it) is caught in the workers; a PNG handed to DALI (as
    with NATIVE_FORMATS widened) fails inside DALI: the pipeline is rebuilt, the batch keeps its size."""
    root = _mixed_folder(tmp_path, 16)
    if where == "in the workers":
        good = (root / "train" / "c0" / "0.jpg").read_bytes()
        bad = root / "train" / "c0" / "broken.jpg"
        bad.write_bytes(good[:600] + bytes(range(256)) * 8 + b"\xff\xd9")  # end marker intact
    else:
        monkeypatch.setattr(dali, "NATIVE_FORMATS", frozenset({"JPEG", "PNG"}))
        bad = root / "train" / "c0" / "broken.png"
        bad.write_bytes(_broken_png(root / "train" / "c1" / "1.png"))
    cfg = DataConfig(data=str(root), imgsz=32, workers=0)
    splits, info = data.load_splits(cfg)
    assert not info.skipped and any(bad.name in d["path"] for d in splits["train"]["image"])
    train, _ = _loaders(cfg, RGB, "dali", batch=4)
    for epoch in (1, 2):
        train.set_epoch(epoch)
        batches = list(train)
        assert len(batches) == len(train) and all(len(b) == 4 and b.labels.shape[0] == 4 for b in batches)
    err = capfd.readouterr().err
    assert err.count("skipped unreadable image") == 1 and str(bad) in err, err
    assert ("(DALI:" in err) == (where == "inside DALI")


def test_backend_choice(monkeypatch):
    assert data.choose_backend(DataConfig(), "cpu").name == "torch"  # auto on a CPU: timings and tests unchanged
    assert data.choose_backend(DataConfig(), "cuda") == data.Backend(
        "dali", "auto: CUDA device and nvidia.dali available"
    )
    augmented = data.choose_backend(DataConfig(auto_augment="rand-m9-mstd0.5"), "cuda")
    assert augmented.name == "torch" and "no DALI equivalent" in augmented.note
    assert data.choose_backend(DataConfig(loader="torch"), "cuda").name == "torch"
    streamed = DataConfig(data="shards/", streaming=True)
    assert data.choose_backend(streamed, "cuda").name == "torch"  # a stream's loader feeds no DALI stage
    with pytest.raises(UserError, match="--loader dali does not read --streaming data"):
        data.choose_backend(DataConfig(data="shards/", streaming=True, loader="dali"), "cuda")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if not installed: importing it fails
    assert "not installed" in data.choose_backend(DataConfig(), "cuda").reason
    with pytest.raises(UserError, match=r'pip install -e "\.\[dali\]"'):
        data.choose_backend(DataConfig(loader="dali"), "cpu")
