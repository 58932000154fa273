"""The DALI path with the "mixed" decoder (the GPU's JPEG decoders) on a real GPU: the torch path's pixels on the
same windows, batches on the GPU, repeatable, and a short `--loader dali` training run picked by `auto`.

Run on a machine with a GPU and DALI: `python -m pytest tests/gpu -q` (install the DALI wheel there first;
see docs/benchmarks.md, `bench/gpu_checks.sh`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from trainer import data
from trainer.config import DataConfig
from trainer.data.transforms import Preprocess

pytestmark = pytest.mark.gpu
pytest.importorskip("nvidia.dali")
ROOT = Path(__file__).resolve().parents[2]
PRE = Preprocess(64, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875)


def _jpegs(root: Path, count: int = 64) -> Path:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(count):
        k = i % 2
        base = (np.sin(x / (17 + k)) + np.cos(y / (23 + i % 7))) * 60 + 128
        rgb = np.stack([base, base[::-1], base[:, ::-1]], axis=-1) + rng.normal(0, 12, (375, 500, 3))
        folder = root / "train" / f"c{k}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def _batches(cfg: DataConfig, loader: str, device: torch.device | None = None) -> list:
    dataset = data.Data(*data.load_splits(cfg))
    spec = data.loader_spec(cfg, data.Backend(loader, "test"), PRE)
    train, _ = data.build_loaders(None, dataset, cfg, spec, 16)
    if loader == "dali":
        train = dataclasses.replace(train, stage=train.stage.on(device))
    train.set_epoch(1)
    return list(train)


def test_mixed_decoder_matches_torch_path_and_repeats(tmp_path: Path):
    cfg = DataConfig(data=str(_jpegs(tmp_path)), imgsz=64, workers=0, hflip=0.5)
    cuda = torch.device("cuda", 0)
    reference = _batches(cfg, "torch")
    first, second = _batches(cfg, "dali", cuda), _batches(cfg, "dali", cuda)
    std = torch.tensor(PRE.std, device=cuda).view(1, 3, 1, 1)
    for ref, a, b in zip(reference, first, second, strict=True):
        (x_ref, y_ref), (x, y), (x2, y2) = (ref.images, ref.labels), (a.images, a.labels), (b.images, b.labels)
        assert x.device.type == "cuda" and y.device.type == "cuda"
        assert torch.equal(y.cpu(), y_ref)
        # The hardware decoder's IDCT and upsampling differ from libjpeg's by a few levels on some pixels.
        assert ((x - x_ref.to(cuda)).abs() * std).mean().item() <= 1.5 / 255
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_auto_picks_dali_on_cuda_and_trains(tmp_path: Path):
    root = _jpegs(tmp_path / "jpegs", 96)
    args = ["--data", str(root), "--imgsz", "64", "--epochs", "1", "--batch-size", "32", "--tracker", "none"]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", *args, "--project", str(tmp_path / "runs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = yaml.safe_load((tmp_path / "runs" / "exp" / "config.yaml").read_text())
    assert record["launch"]["loader"] == "dali" and record["launch"]["loader_reason"].startswith("auto: CUDA")
