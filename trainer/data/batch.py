"""What a loader yields: `Batch` (pixels and targets, what the loop trains on) and `EncodedBatch` (what DataLoader
workers hand the DALI backend: encoded bytes and crop windows, decoded in the training process)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch


@dataclass(frozen=True)
class Failed:
    """A sample left out of its batch instead of replaced (`trainer predict`): its path and why it failed."""

    path: str
    reason: str


def label_tensor(values: list) -> torch.Tensor:
    """Collated labels: int64 class indices (B,), or float32 multi-hot rows (B, C) for multi-label data."""
    if values and isinstance(values[0], list | tuple | np.ndarray):
        return torch.tensor(np.asarray(values), dtype=torch.float32)
    return torch.tensor(values, dtype=torch.long)


@dataclass
class Batch:
    """A batch the model sees. `labels`: class indices, or class probabilities once mixup/cutmix mixed the batch;
    for multi-label data float multi-hot rows (B, C), mixed the same way.

    `indices`: the samples' positions in their dataset (kept by `trainer predict` to name each file);
    `failed`: {path: reason} of files left out of this batch instead of replaced (`trainer predict`).
    accelerate moves a Batch to the device through `to` (its `send_to_device` calls it); DataLoader pins it
    through `pin_memory`."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None = None
    failed: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device, non_blocking: bool = False) -> Batch:
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())


@dataclass
class EncodedBatch:
    """A batch for the DALI backend: per sample its encoded bytes, the crop window to decode ((x, y, w, h) in its own
    pixels), whether to flip it, its label, its index in the dataset (to fetch a replacement for a file DALI rejects),
    its path, and its seed (drawn under its own: random erasing on the device repeats it); `failed` as in Batch.

    Deliberately without `to`: accelerate leaves it where it is, and the DALI stage places the decoded result."""

    encoded: list[np.ndarray]
    windows: np.ndarray  # (B, 4) float32
    flips: np.ndarray  # (B,) int32
    labels: torch.Tensor
    indices: np.ndarray  # (B,) int64
    paths: list[str]
    seeds: np.ndarray  # (B,) int64
    failed: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.encoded)

    def take(self, keep: list[int]) -> EncodedBatch:
        """Only the samples at positions `keep`."""
        return replace(
            self,
            encoded=[self.encoded[j] for j in keep],
            windows=self.windows[keep],
            flips=self.flips[keep],
            labels=self.labels[keep],
            indices=self.indices[keep],
            paths=[self.paths[j] for j in keep],
            seeds=self.seeds[keep],
        )
