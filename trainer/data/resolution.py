"""Resolution: the training image size of each epoch (--progressive), and the size in force shared with workers.

The size is a pure function of the epoch (`SizeSchedule.size`), so every rank, every DataLoader worker and a resumed
run agree on it without saving anything: `Loader.set_epoch` sets `TrainSize` before an epoch's batches are drawn, and
the transforms (torch: `ImageTransform`; DALI: `DaliStage`) read it. A crop's window and flip do not depend on the
output size, so the random draws of a batch are the same at any size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.config import DataConfig

# CNNs at ImageNet sizes take steps of their stride (32, as FFCV's ramp); below, a quarter of the size rounded to a
# power of two (32 px -> steps of 8), so a small ramp still has sizes between its ends.
LARGE_PX, LARGE_STEP = 128, 32


def size_step(imgsz: int, patch_size: int = 0) -> int:
    """The step a ramp's sizes are rounded to: the patch size of a ViT-like model, else by `imgsz` (see LARGE_PX)."""
    if patch_size:
        return patch_size
    if imgsz >= LARGE_PX:
        return LARGE_STEP
    return max(4, 2 ** int(math.log2(max(1, imgsz // 4))))


@dataclass(frozen=True)
class SizeSchedule:
    """--progressive: `start_px` up to epoch `ramp[0]`, `end_px` (--imgsz) from epoch `ramp[1]` on, linear between,
    rounded to a multiple of `step`. Epochs count from 1."""

    start_px: int
    end_px: int
    ramp: tuple[int, int]
    step: int

    def size(self, epoch: int) -> int:
        first, last = self.ramp
        if epoch >= last:
            return self.end_px
        if epoch <= first:
            return self.start_px
        px = self.start_px + (self.end_px - self.start_px) * (epoch - first) / (last - first)
        rounded = math.floor(px / self.step + 0.5) * self.step
        return min(self.end_px, max(self.start_px, rounded))

    def sizes(self, epochs: int) -> list[int]:
        """The size of every epoch, 1 to `epochs`."""
        return [self.size(epoch) for epoch in range(1, epochs + 1)]

    def describe(self, epochs: int) -> str:
        """`progressive resizing: 16 px (epochs 1-2), 24 (3), 32 (4-5); batch size unchanged` for the header."""
        runs: list[list[int]] = []
        for epoch, px in enumerate(self.sizes(epochs), start=1):
            if runs and runs[-1][0] == px:
                runs[-1][2] = epoch
            else:
                runs.append([px, epoch, epoch])
        parts = [f"{px} px (epoch{'s' if a != b else ''} {a}{f'-{b}' if a != b else ''})" for px, a, b in runs]
        return f"progressive resizing: {', '.join(parts)}, steps of {self.step} px; batch size unchanged"


def size_schedule(cfg: DataConfig, epochs: int, patch_size: int = 0) -> SizeSchedule | None:
    """The run's schedule (None without --progressive); `patch_size`: the model's, when it cuts images in patches."""
    if not cfg.progressive:
        return None
    return SizeSchedule(cfg.progressive, cfg.imgsz, cfg.ramp_epochs(epochs), size_step(cfg.imgsz, patch_size))


class TrainSize:
    """The training size in force: set by the training process at each epoch, read by the transforms in the
    DataLoader workers (shared memory, as `SeededBatches.epoch`: persistent workers see the new value)."""

    def __init__(self, schedule: SizeSchedule):
        self.schedule = schedule
        self.px = torch.full((), schedule.size(1), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.px.fill_(self.schedule.size(epoch))

    def __int__(self) -> int:
        return int(self.px)
