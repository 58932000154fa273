"""Images/s of trainer's training loader against a bare torchvision ImageFolder loader, side by side.

Both read the same generated folder of JPEGs (500x375 by default) through the same timm training transform, with
the same batch size, workers, shuffling and prefetch; only the dataset layer differs (HF `datasets` + trainer's
ImageTransform and SkipUnreadable vs torchvision's ImageFolder). Epochs alternate between the two loaders so that
machine load hits both alike; the median epoch of each is reported, then the ratio (goal: >= 0.95).

    python bench/data_throughput.py            # 2,000 images, 5 timed epochs each
    python bench/data_throughput.py --quick    # 400 images, 3 epochs each: about a minute on 2 cores
    python bench/data_throughput.py --loader dali   # also the DALI CPU path (goal: >= 1.5x trainer's torch loader)

With --loader dali the DALI path gets the same CPU budget: its DataLoader workers only read bytes and draw windows
(--dali-workers, default 0: in the main process) and DALI decodes with --workers threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_jpegs(root: Path, count: int, classes: int, width: int, height: int) -> Path:
    """`root/train/class_k/i.jpg` photos-like JPEGs (smooth gradients plus noise, quality 90); reused if present."""
    marker = root / f".complete-{count}-{classes}-{width}x{height}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        k = i % classes
        base = (np.sin(x / (17 + k)) + np.cos(y / (23 + i % 7))) * 60 + 128
        rgb = np.stack([base, base[::-1], base[:, ::-1]], axis=-1) + rng.normal(0, 12, (height, width, 3))
        folder = root / "train" / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    marker.touch()
    return root


def time_epoch(loader) -> float:
    """Images per second over one pass."""
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch) if hasattr(batch, "images") else batch[0].shape[0]  # ours: Batch; torchvision: a list
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="400 images, 3 timed epochs per loader")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per loader (after one warm-up each)")
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "trainer-bench-jpegs"))
    parser.add_argument("--loader", choices=("torch", "dali"), default="torch", help="dali: add the DALI CPU path")
    parser.add_argument("--dali-workers", type=int, default=0, help="byte-reading workers of the DALI path")
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs = 400, 3

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from trainer import data
    from trainer.config import DataConfig
    from trainer.data import Preprocess, load_splits
    from trainer.data.transforms import resolve_scale

    root = write_jpegs(Path(args.root) / str(args.images), args.images, classes=10, width=500, height=375)
    cfg = DataConfig(data=str(root), imgsz=args.imgsz, workers=args.workers, hflip=0.5)
    pre = Preprocess(args.imgsz, 3, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bilinear", 0.875)

    start = time.perf_counter()
    splits, info = load_splits(cfg)  # scan + up-front check of every file + stratified hold-out
    setup_s = time.perf_counter() - start
    dataset = data.Data(splits, info)
    spec = data.LoaderSpec(data.Backend("torch", "bench"), pre, args.workers)
    ours, _ = data.build_loaders(None, dataset, cfg, spec, args.batch_size)

    # The bare loader sees the same training files (the hold-out's), the same transform and loader settings.
    train_files = {d["path"] for d in splits["train"]["image"]}
    bare_set = ImageFolder(
        str(root / "train"),
        transform=create_transform(
            input_size=(3, args.imgsz, args.imgsz),
            is_training=True,
            scale=resolve_scale(cfg),
            hflip=0.5,
            color_jitter=None,
            interpolation=pre.interpolation,
            mean=pre.mean,
            std=pre.std,
            crop_pct=pre.crop_pct,
        ),
        is_valid_file=lambda p: str(Path(p).resolve()) in train_files,
    )
    workers = args.workers
    bare = DataLoader(
        bare_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )
    print(
        f"{len(bare_set)} training JPEGs 500x375 -> {args.imgsz}px, batch {args.batch_size}, {workers} workers, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; trainer setup (scan + check) {setup_s:.2f}s"
    )
    loaders = {"trainer": ours, "torchvision": bare}
    if args.loader == "dali":
        dali_cfg = dataclasses.replace(cfg, workers=args.dali_workers, loader="dali")
        dali_spec = data.LoaderSpec(data.Backend("dali", "bench"), pre, args.dali_workers)
        dali, _ = data.build_loaders(None, dataset, dali_cfg, dali_spec, args.batch_size)
        dali.stage.spec = dataclasses.replace(dali.stage.spec, threads=max(1, workers))  # the torch loader's workers
        loaders["dali-cpu"] = dali
        print(f"DALI CPU path: {args.dali_workers} byte-reading workers, {dali.stage.spec.threads} DALI threads")
    for loader in loaders.values():
        time_epoch(loader)  # warm-up: worker start, page cache, DALI pipeline build
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for epoch in range(args.epochs):
        for name, loader in loaders.items():  # alternating, so machine load hits every loader alike
            rates[name].append(time_epoch(loader))
        print(f"epoch {epoch + 1}: " + ", ".join(f"{name} {r[-1]:.0f} img/s" for name, r in rates.items()))
    med = {name: statistics.median(r) for name, r in rates.items()}
    for name, value in med.items():
        print(f"{name + ' loader':18} {value:8.1f} img/s (median of {args.epochs})")
    print(f"ratio trainer/bare {med['trainer'] / med['torchvision']:8.3f}  (goal >= 0.95)")
    if "dali-cpu" in med:
        print(f"ratio dali/trainer {med['dali-cpu'] / med['trainer']:8.3f}  (goal >= 1.5)")
        print(f"ratio dali/bare    {med['dali-cpu'] / med['torchvision']:8.3f}")


if __name__ == "__main__":
    main()
