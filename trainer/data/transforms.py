"""Augmentation and normalisation: what the run's flags mean for its images (`resolve_hflip`, `resolve_scale`,
`train_mixup`, `describe_augmentation`), the input geometry a model expects (`Preprocess`, resolved from timm and
stored with the weights), and the torch backend's transform (`ImageTransform`: decoded images -> tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trainer.config import DataConfig, UserError
from trainer.data.batch import Batch, Failed, label_tensor
from trainer.data.decode import decode_image
from trainer.data.resolution import TrainSize

if TYPE_CHECKING:
    from trainer.data.splits import DataInfo


@dataclass(frozen=True)
class Preprocess:
    """Input geometry and normalisation; stored in the weights' metadata so inference can repeat it."""

    imgsz: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float


def resolve_preprocess(cfg: DataConfig, model, in_chans: int) -> Preprocess:
    """Normalisation, interpolation and crop from the model's pretrained config, at our image size."""
    from timm.data import resolve_data_config

    timm_cfg = resolve_data_config(model=model)
    mean, std = tuple(timm_cfg["mean"]), tuple(timm_cfg["std"])
    if in_chans != len(mean):
        # One-channel models see the average of the RGB statistics (what timm's adapted first conv implies).
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return Preprocess(cfg.imgsz, in_chans, mean, std, timm_cfg["interpolation"], float(timm_cfg["crop_pct"]))


def dataset_record(cfg: DataConfig, info: DataInfo, pre: Preprocess) -> dict:
    """The dataset facts written to config.yaml and the trackers."""
    return {
        "source": info.source,
        "train_size": info.train_size,
        "val_size": info.val_size,
        "val_split": info.val_split,
        "num_classes": len(info.class_names),
        "class_names": info.class_names,
        "task": info.task,
        "in_chans": pre.in_chans,
        "hflip": resolve_hflip(cfg, info),
        "scale": list(resolve_scale(cfg)),
        "mean": list(pre.mean),
        "std": list(pre.std),
        "skipped_files": len(info.skipped),
        **({"excluded_files": len(info.excluded), "exclusion": info.exclusion} if info.excluded else {}),
    }


class ImageTransform:
    """The torch backend's per-sample work: stored examples -> decoded, augmented (C, H, W) float tensors + labels.

    `collate` stacks a batch into a `Batch` (mixup/cutmix come later, in the training process: data/mixing.py).
    Samples that failed and were not replaced (`Failed`) go to `Batch.failed`.
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
        size: TrainSize | None = None,
    ):
        """`size`: --progressive's size in force, read at each batch (a transform per size, made when first used)."""
        self.mode = "L" if pre.in_chans == 1 else "RGB"
        self.size = size
        self._options = dict(
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
        self.in_chans = pre.in_chans
        self.tf = self._create(pre.imgsz)
        self._sized = {pre.imgsz: self.tf}

    def _create(self, imgsz: int):
        from timm.data import create_transform

        try:
            return create_transform(input_size=(self.in_chans, imgsz, imgsz), **self._options)
        except (AssertionError, KeyError, ValueError) as e:  # timm's reaction to a malformed policy string
            policy = self._options["auto_augment"]
            raise UserError(f"--auto-augment {policy!r}: not a valid timm policy ({e})") from e

    def _transform(self):
        """The transform of the size in force (--progressive), else the one of `pre.imgsz`."""
        if self.size is None:
            return self.tf
        px = int(self.size)
        if px not in self._sized:
            self._sized[px] = self._create(px)
        return self._sized[px]

    @classmethod
    def training(cls, pre: Preprocess, augment: Augment) -> ImageTransform:
        """The training transform of the augmentation in force (`resolve_augment`)."""
        return cls(
            pre,
            True,
            augment.hflip,
            augment.scale,
            auto_augment=augment.auto_augment,
            random_erase=augment.random_erase,
            size=augment.size,
        )

    def __call__(self, batch: dict) -> dict:
        return {
            **batch,
            "image": [self._transform()(decode_image(value).convert(self.mode)) for value in batch["image"]],
        }

    def collate(self, examples: list) -> Batch:
        failed = {e.path: e.reason for e in examples if isinstance(e, Failed)}
        examples = [e for e in examples if not isinstance(e, Failed)]
        if not examples:
            return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), failed)
        images = torch.stack([e["image"] for e in examples])
        labels = label_tensor([e["label"] for e in examples])
        indices = torch.tensor([e["index"] for e in examples]) if "index" in examples[0] else None
        return Batch(images, labels, indices, failed)


def resolve_hflip(cfg: DataConfig, info: DataInfo) -> float:
    """The flip probability in force: the flag's, or the dataset's default when the flag is -1."""
    return info.default_hflip if cfg.hflip < 0 else cfg.hflip


def resolve_scale(cfg: DataConfig) -> tuple[float, float]:
    """The crop area range in force: the flag's, or by image size (small images lose too much to tight crops)."""
    if cfg.scale:
        return cfg.scale
    return (0.8, 1.0) if cfg.imgsz <= 64 else (0.08, 1.0)


def describe_augmentation(cfg: DataConfig, info: DataInfo) -> str:
    """The training augmentation in force, in one line for the run's header (defaults say where they come from)."""
    hflip = resolve_hflip(cfg, info)
    if cfg.hflip >= 0:
        flip = f"hflip {hflip:g}"
    elif hflip > 0:
        flip = f"hflip {hflip:g} (default; --hflip 0 for digits/text)"
    else:
        flip = f"hflip 0 (default for {info.source})"
    low, high = resolve_scale(cfg)
    crop = f"crop area {low:g}-{high:g}"
    if not cfg.scale:
        crop += f" (default {'up to' if cfg.imgsz <= 64 else 'above'} 64 px)"
    on = [flip, crop]
    off = []
    for name, value in (
        ("auto-augment", cfg.auto_augment),
        ("mixup", f"{cfg.mixup:g}" if cfg.mixup > 0 else ""),
        ("cutmix", f"{cfg.cutmix:g}" if cfg.cutmix > 0 else ""),
        ("random erasing", f"{cfg.random_erase:g}" if cfg.random_erase > 0 else ""),
    ):
        (on if value else off).append(f"{name} {value}" if value else name)
    return f"augment: {', '.join(on)}" + (f"; off: {', '.join(off)}" if off else "")


def train_mixup(cfg: DataConfig, info: DataInfo, per_device_batch_size: int):
    """timm's `Mixup` for --mixup/--cutmix (None when both are off); data/mixing.py runs it on both backends' batches.
    Label smoothing stays with the loss: F.cross_entropy smooths probability targets exactly as timm's Mixup would."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    if per_device_batch_size % 2:
        raise UserError(
            f"--mixup/--cutmix pair neighbouring images of a batch and need an even per-process batch, "
            f"got {per_device_batch_size}; change --batch-size"
        )
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        label_smoothing=0.0,
        num_classes=len(info.class_names),
        multi_label=info.multilabel,  # mixes the multi-hot rows themselves
    )


@dataclass(frozen=True)
class Augment:
    """The training augmentation in force, resolved from the flags and the data (both backends apply it)."""

    hflip: float
    scale: tuple[float, float]
    auto_augment: str = ""
    random_erase: float = 0.0
    mixup: object = None  # timm Mixup for --mixup/--cutmix, or None
    size: TrainSize | None = None  # --progressive: the training size in force (None: pre.imgsz throughout)


def resolve_augment(
    cfg: DataConfig, info: DataInfo, per_device_batch_size: int, size: TrainSize | None = None
) -> Augment:
    """The augmentation flags as they apply to this data and batch (defaults resolved, mixup built); `size`: the
    training size in force under --progressive."""
    return Augment(
        resolve_hflip(cfg, info),
        resolve_scale(cfg),
        auto_augment=cfg.auto_augment,
        random_erase=cfg.random_erase,
        mixup=train_mixup(cfg, info, per_device_batch_size),
        size=size,
    )
