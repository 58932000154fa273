"""Decoding and augmentation: the one seam (`ImageTransform`) between stored images and the model's tensors."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.config import DataConfig, UserError

if TYPE_CHECKING:
    from trainer.data import DataInfo, Preprocess


class UnreadableImage(Exception):
    """An image that cannot be decoded; carries its path for the warning."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} ({reason})")
        self.path = path


def decode_image(value):
    """A stored image (datasets' {"bytes", "path"}, a path, bytes, an array or a PIL image) -> loaded PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str | bytes):
        data, path = (None, value) if isinstance(value, str) else (value, None)
    else:
        return Image.fromarray(np.asarray(value, dtype=np.uint8))
    try:
        img = Image.open(io.BytesIO(data) if data is not None else path)
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise UnreadableImage(path or "<embedded bytes>", f"{type(e).__name__}: {e}".split("\n")[0]) from e
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what PIL asks for before dropping a palette's transparency
    return img


class ImageTransform:
    """Stored examples -> (C, H, W) float tensors + labels. The single seam for decoding and augmentation.

    `collate` stacks a batch and, when `mixup` (a timm `Mixup`) is given, mixes it into class-probability targets.
    """

    def __init__(
        self,
        pre: Preprocess,
        train: bool,
        hflip: float = 0.0,
        scale: tuple[float, float] = (0.08, 1.0),
        *,
        auto_augment: str = "",
        random_erase: float = 0.0,
        mixup=None,
    ):
        from timm.data import create_transform

        self.mode = "L" if pre.in_chans == 1 else "RGB"
        self.mixup = mixup
        try:
            self.tf = create_transform(
                input_size=(pre.in_chans, pre.imgsz, pre.imgsz),
                is_training=train,
                scale=scale,
                hflip=hflip,
                color_jitter=None,  # colour jitter on digits and scans does more harm than good; off by default
                auto_augment=auto_augment or None,
                re_prob=random_erase,
                re_mode="pixel",
                interpolation=pre.interpolation,
                mean=pre.mean,
                std=pre.std,
                crop_pct=pre.crop_pct,
            )
        except (AssertionError, KeyError, ValueError) as e:  # timm's reaction to a malformed policy string
            raise UserError(f"--auto-augment {auto_augment!r}: not a valid timm policy ({e})") from e

    def __call__(self, batch: dict) -> dict:
        return {
            "image": [self.tf(decode_image(value).convert(self.mode)) for value in batch["image"]],
            "label": batch["label"],
        }

    def collate(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([e["image"] for e in examples])
        labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        if self.mixup is not None:
            # Label smoothing stays with the loss: F.cross_entropy smooths probability targets exactly as timm's
            # Mixup would, so the loop's loss is unchanged.
            images, labels = self.mixup(images, labels)
        return images, labels


def resolve_hflip(cfg: DataConfig, info: DataInfo) -> float:
    """The flip probability in force: the flag's, or the dataset's default when the flag is -1."""
    return info.default_hflip if cfg.hflip < 0 else cfg.hflip


def resolve_scale(cfg: DataConfig) -> tuple[float, float]:
    """The crop area range in force: the flag's, or by image size (small images lose too much to tight crops)."""
    if cfg.scale:
        return cfg.scale
    return (0.8, 1.0) if cfg.imgsz <= 64 else (0.08, 1.0)


def build_train_transform(
    cfg: DataConfig, info: DataInfo, pre: Preprocess, per_device_batch_size: int
) -> ImageTransform:
    """The training transform: the augmentation flags and mixup/cutmix. Evaluation uses `ImageTransform(pre, False)`."""
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        if per_device_batch_size % 2:
            raise UserError(
                f"--mixup/--cutmix pair images within a batch and need an even per-process batch, "
                f"got {per_device_batch_size}; change --batch-size"
            )
        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=0.0, num_classes=len(info.class_names)
        )
    return ImageTransform(
        pre,
        True,
        resolve_hflip(cfg, info),
        resolve_scale(cfg),
        auto_augment=cfg.auto_augment,
        random_erase=cfg.random_erase,
        mixup=mixup,
    )
