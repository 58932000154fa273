"""Tuning runs of `trainer train`: early stopping (--patience), at 1 and 2 gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CPU_2PROC, accelerate_launch, check, config_of, results, run, trainer

from trainer.files import STATE_FILE, checkpoint_dirs

# An lr so small the weights never change what they predict: val top-1 is the same every epoch, so epoch 1 is the
# best and no later one improves on it (the best is a strict improvement). A ViT has no BatchNorm statistics
# that would move without the lr.
STUCK = ("--data", "digits", "--imgsz", "16", "--model", "test_vit", "--batch-size", "64", "--tracker", "none")
STUCK += ("--lr", "1e-12", "--min-lr", "0", "--warmup-lr", "0", "--warmup-epochs", "0", "--sched", "constant")


@pytest.mark.parametrize("ranks", [1, 2])
def test_patience_stops_after_the_right_epoch(workdir: Path, ranks: int):
    """--patience 2 on a run whose best is epoch 1: it ends normally after epoch 3 of 6, on every rank alike."""
    args = ("train", *STUCK, "--epochs", "6", "--patience", "2")
    cmd = accelerate_launch(CPU_2PROC, *args) if ranks == 2 else trainer(*args)
    proc = check(run(cmd, workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    assert config_of(run_dir)["launch"]["num_processes"] == ranks
    assert [int(r["epoch"]) for r in results(run_dir)] == [1, 2, 3]
    assert "stopped early at epoch 3" in proc.stdout and "since epoch 1" in proc.stdout
    assert (run_dir / "weights" / "best.safetensors").is_file() and (run_dir / "weights" / "last.safetensors").is_file()
    assert (run_dir / "results.png").is_file()
    # The count is in every rank's checkpoint state, so a resume keeps counting; the run is finished for --resume auto.
    newest = checkpoint_dirs(run_dir)[-1]
    for rank in range(ranks):
        state = json.loads((newest / STATE_FILE.format(rank=rank)).read_text())
        assert state["epoch"] == 3 and state["epochs_since_best"] == 2 and state["stopped_epoch"] == 3
    if ranks == 1:
        again = check(run(trainer(*args, "--resume", "auto"), workdir))
        assert "nothing to do" in again.stderr, again.stderr
