"""A model built for a fixed input size (timm's ViT, 224 px) trained at another size through the real CLI."""

from __future__ import annotations

import torch
from conftest import check, results, run, trainer

from trainer.use.inference import load_model, read_weights


def test_vit_trains_at_32_px_and_its_weights_load_back_at_32_px(workdir):
    """The issue's failing command: without img_size timm's ViT stops at the first batch ("Input height (32)
    doesn't match model (224)"). Here it trains and learns, and the model that val/predict/export rebuild from the
    weights file takes 32 px images."""
    args = ["--data", "digits", "--model", "vit_tiny_patch16_224", "--imgsz", "32", "--epochs", "1"]
    check(run(trainer("train", *args, "--batch-size", "64", "--tracker", "none", "--workers", "0"), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    assert float(results(run_dir)[0]["val/top1"]) > 0.3  # 10 classes: chance is 0.1
    weights = read_weights(run_dir / "weights" / "best.safetensors")
    assert weights.pre.imgsz == 32
    model = load_model(weights)  # strict load: every tensor, including the 2x2-patch position embedding
    assert model.patch_embed.img_size == (32, 32)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
