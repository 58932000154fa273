"""Real runs of the training recipe: weight EMA, channels-last, torch.compile and every shipped preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, check, config_of, results, run, trainer

from trainer.run.weights import read_metadata

FAST = ("--data", "digits", "--imgsz", "16", "--batch-size", "64", "--tracker", "none")
PRESETS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "sweep.yaml")  # test_sweep.py runs that


def test_ema_with_grad_accum_and_channels_last(workdir: Path):
    """Model and EMA are both evaluated each epoch; best.safetensors comes from the better one and says which."""
    check(run(trainer("train", *FAST, "--epochs", "2", "--grad-accum", "2", "--ema", "--channels-last"), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    rows = results(run_dir)
    assert len(rows) == 2 and {"val/top1_ema", "val/loss_ema", "val/top5_ema"} <= set(rows[0])
    # The average lags the trained weights: its metrics are its own, and it has learned something.
    assert all(r["val/loss_ema"] != r["val/loss"] for r in rows)
    assert float(rows[-1]["val/top1_ema"]) > 0.5

    # Per epoch the better of the two; the first epoch with the highest score wrote best.safetensors.
    scores = [max(float(r["val/top1"]), float(r["val/top1_ema"])) for r in rows]
    epoch = scores.index(max(scores)) + 1
    row = rows[epoch - 1]
    kind = "ema" if float(row["val/top1_ema"]) > float(row["val/top1"]) else "model"
    best = read_metadata(run_dir / "weights" / "best.safetensors")
    assert (best["weights"], best["epoch"]) == (kind, str(epoch))
    assert float(best["val_top1"]) == pytest.approx(max(scores), abs=1e-5)
    assert read_metadata(run_dir / "weights" / "last.safetensors")["weights"] == "model"
    assert config_of(run_dir)["model"]["channels_last"] is True


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_runs(workdir: Path, preset: Path):
    """Every shipped preset loads and trains (an epoch of the small digits; no hub weights offline)."""
    check(run(trainer("train", "--config", str(preset), *FAST, "--epochs", "1", "--pretrained="), workdir))
    cfg = config_of(workdir / "runs" / "train" / "exp")
    wanted = yaml.safe_load(preset.read_text())
    assert cfg["optim"] | wanted["optim"] == cfg["optim"]  # the preset's optimizer settings were applied
    assert len(results(workdir / "runs" / "train" / "exp")) == 1


@pytest.mark.slow
def test_compile_run_completes(workdir: Path):
    """--compile through Accelerate's dynamo plugin: inductor compiles train and eval graphs and the run finishes."""
    proc = check(run(trainer("train", *FAST, "--epochs", "1", "--model", "test_resnet", "--compile"), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    assert config_of(run_dir)["launch"]["dynamo_backend"] == "inductor"
    assert float(results(run_dir)[0]["val/top1"]) > 0.1, proc.stdout
