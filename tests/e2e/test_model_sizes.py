"""A model built for a fixed input size (timm's ViT, 224 px) trained at another size through the real CLI."""

from __future__ import annotations

from conftest import check, results, run, trainer

from trainer.checkpoint import read_metadata


def test_vit_trains_at_32_px_and_its_weights_validate(workdir):
    """The issue's failing command: without img_size timm's ViT stops at the first batch ("Input height (32)
    doesn't match model (224)"). Here it trains, learns, and `trainer val` rebuilds it at 32 px from the file."""
    args = ["--data", "digits", "--model", "vit_tiny_patch16_224", "--imgsz", "32", "--epochs", "2"]
    check(run(trainer("train", *args, "--batch-size", "64", "--tracker", "none"), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    rows = results(run_dir)
    assert len(rows) == 2
    assert float(rows[-1]["val/top1"]) > 0.5  # 10 classes: chance is 0.1
    weights = run_dir / "weights" / "best.safetensors"
    assert read_metadata(weights)["imgsz"] == "32"
    val = check(run(trainer("val", "--weights", str(weights)), workdir))
    best = max(float(r["val/top1"]) for r in rows)
    assert f"top1 {best:.4f}" in val.stdout
