"""The first batches of each input path, fingerprinted for a fixed seed: folder + torch loader, folder + DALI on the
CPU, and a WebDataset stream. Sample indices, crop windows, flips, labels and a checksum of the pixels must stay
exactly what they were when this test was committed (before the data pipeline was redesigned, issue 18): a change
to the data code that alters any batch fails here.

`first_batches` is the only part that knows the data package's interface. The fingerprints live in
pipeline_fingerprint.json; `TRAINER_WRITE_FINGERPRINT=1` rewrites them (only ever on purpose, in its own commit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import data
from trainer.config import DataConfig
from trainer.data.convert import convert
from trainer.data.transforms import Preprocess

GOLDEN = Path(__file__).with_name("pipeline_fingerprint.json")
PRE = Preprocess(32, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)
BATCH = 8
SEED = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """40 JPEGs of varied sizes in train/ (3 classes) and 12 in val/, drawn from a fixed generator."""
    root = tmp_path_factory.mktemp("fingerprint")
    rng = np.random.default_rng(7)
    for split, count in (("train", 40), ("val", 12)):
        for i in range(count):
            height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))
            y, x = np.mgrid[0:height, 0:width].astype(np.float32)
            planes = [np.sin(x / (5 + i % 7)) * 90 + 128, np.cos(y / (4 + i % 5)) * 90 + 128, (x * y) % 255]
            noise = rng.normal(0, 10, (height, width, 3))
            pixels = np.clip(np.stack(planes, -1) + noise, 0, 255).astype(np.uint8)
            sub = root / split / f"class_{i % 3}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(sub / f"{split}_{i:03d}.jpg", quality=88)
    return root


def _sha(array) -> str:
    array = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def _fingerprint(images: torch.Tensor, labels: torch.Tensor, **extra) -> dict:
    out = {
        "shape": list(images.shape),
        "pixels": _sha(images.cpu().numpy().astype(np.float32)),
        "pixel_sum": round(float(images.double().sum()), 3),
        "labels": labels.cpu().tolist() if labels.ndim == 1 else _sha(labels.cpu().numpy().astype(np.float32)),
    }
    return out | extra


def first_batches(cfg: DataConfig, loader: str, count: int = 2) -> dict:
    """The first `count` training batches of epoch 1 and the first validation batch, as one process sees them."""
    from accelerate import Accelerator, DataLoaderConfiguration

    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=SEED)
    )
    dataset = data.Data(*data.load_splits(cfg))
    spec = data.loader_spec(cfg, data.Backend(loader, "test"), PRE, seed=SEED)
    train, val = data.build_loaders(accelerator, dataset, cfg, spec, BATCH)
    train.set_epoch(1)
    batches = []
    if loader == "dali":  # the workers' side too: which samples, which windows, which flips
        inner = iter(train.batches)
        for _ in range(count):
            encoded = next(inner)
            batches.append(
                {"indices": encoded.indices.tolist(), "windows": _sha(encoded.windows), "flips": encoded.flips.tolist()}
            )
        train.set_epoch(1)
    elif not cfg.streaming:
        sampler = list(iter(train.batches.batch_sampler))[:count]
        batches = [{"indices": [int(i) for i in b]} for b in sampler]
    for n, batch in enumerate(train):
        if n == count:
            break
        if n < len(batches):
            batches[n] |= _fingerprint(batch.images, batch.labels)
        else:
            batches.append(_fingerprint(batch.images, batch.labels))
    batch = next(iter(val))
    return {"train": batches, "val": _fingerprint(batch.images, batch.labels), "train_size": dataset.info.train_size}


def _cases(folder: Path, tmp: Path) -> dict:
    shards = tmp / "shards"
    if not shards.exists():
        convert(str(folder), str(shards), "webdataset", "16")
    base = dict(imgsz=32, workers=0, hflip=0.5, scale=(0.3, 1.0))
    return {
        "folder+torch": (DataConfig(data=str(folder), **base), "torch"),
        "folder+torch+mixup": (DataConfig(data=str(folder), mixup=0.4, cutmix=1.0, **base), "torch"),
        "folder+dali": (DataConfig(data=str(folder), **base), "dali"),
        "webdataset+stream": (DataConfig(data=str(shards), streaming=True, shuffle_buffer=16, **base), "torch"),
    }


@pytest.mark.parametrize("case", ["folder+torch", "folder+torch+mixup", "folder+dali", "webdataset+stream"])
def test_first_batches_match_the_recorded_fingerprint(case, folder, tmp_path_factory, fresh_accelerate_state):
    if case.endswith("dali"):
        pytest.importorskip("nvidia.dali")
    cfg, loader = _cases(folder, tmp_path_factory.getbasetemp())[case]
    got = first_batches(cfg, loader)
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("TRAINER_WRITE_FINGERPRINT") == "1":
        recorded[case] = got
        lines = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(recorded.items())]
        GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
        pytest.skip("fingerprint written")
    assert case in recorded, f"no recorded fingerprint for {case}: TRAINER_WRITE_FINGERPRINT=1 writes one"
    assert got == recorded[case]
