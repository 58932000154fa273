"""Test-time augmentation (`trainer val --tta`, `trainer predict --tta`): logits averaged over views of each image.

The views are made from the batch tensor after the model's eval transform (resize, centre crop, normalise), so
they are the same whichever loader decoded it (torch or DALI) and cost no decoding:
- `flip`: the image and its horizontal mirror (2 forward passes);
- `crops`: ten-crop, the 4 corners and the centre, each CROP_FRACTION of the eval image and resized back to the
  eval size, and the mirror of each (10 forward passes; torchvision's ten_crop).
"""

from __future__ import annotations

import torch

CROP_FRACTION = 0.875  # of the eval image's side, as timm's default crop_pct is of the resized image


def views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The batches the model sees for one batch of eval-transformed images (N, C, H, W)."""
    if mode == "flip":
        return [images, images.flip(-1)]
    from torchvision.transforms.v2 import functional as F

    height, width = images.shape[-2:]
    size = [max(1, round(height * CROP_FRACTION)), max(1, round(width * CROP_FRACTION))]
    return [F.resize(c, [height, width], antialias=True) for c in F.ten_crop(images, size)]


class TTA(torch.nn.Module):
    """A model whose logits are the mean of the wrapped model's logits over `views(images, mode)`."""

    def __init__(self, model: torch.nn.Module, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(v).float() for v in views(images, self.mode)]).mean(dim=0)


def with_tta(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """`model` itself without a mode; else wrapped (in eval mode, as the wrapped model is)."""
    return TTA(model, mode).eval() if mode else model
