"""Write a few images of a dataset's validation split as files, to try `trainer predict` on images that exist.

    python tools/sample_images.py photos/                      # 16 validation digits of the default data (mnist)
    python tools/sample_images.py photos/ --data digits --count 8
    trainer predict --weights runs/train/exp/weights/best.safetensors photos/ photos/000-7.png

The files are `DST/{index:03d}-{class}.{png|jpg|...}`, the image bytes as the dataset stores them, so the true class
is in each name and in predictions.csv's `path` column. They are validation images of the run's split (the same
`--split-seed` hold-out), never trained on. DST must be new or empty.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_samples(dst: Path, data: str = "mnist", count: int = 16) -> list[Path]:
    """The first `count` validation images of `--data data` as files in `dst`; returns their paths."""
    from PIL import Image

    from trainer.config import DataConfig
    from trainer.data import load_splits

    if dst.exists() and any(dst.iterdir()):
        raise SystemExit(f"{dst} is not empty; give a new folder")
    splits, info = load_splits(DataConfig(data=data))
    val = splits["val"]
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(min(count, len(val))):
        row = val[index]
        data_bytes = row["image"]["bytes"] or Path(row["image"]["path"]).read_bytes()
        ext = (Image.open(io.BytesIO(data_bytes)).format or "png").lower().replace("jpeg", "jpg")
        path = dst / f"{index:03d}-{info.class_names[row['label']]}.{ext}"
        path.write_bytes(data_bytes)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a few validation images as files (for trainer predict).")
    parser.add_argument("dst", type=Path, help="folder to write (new or empty)")
    parser.add_argument("--data", default="mnist", help="what --data names (default: mnist, trainer train's default)")
    parser.add_argument("--count", type=int, default=16, help="how many images (default: 16)")
    args = parser.parse_args(argv)
    written = write_samples(args.dst, args.data, args.count)
    print(f"wrote {len(written)} images to {args.dst}: {written[0].name} ... {written[-1].name}")
    return 0


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
