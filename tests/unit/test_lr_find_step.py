"""lr-find trains what `train` trains: the task's loss (BCE on multi-label data), class weights, --freeze and a
teacher's term all reach the sweep (trainer.train.engine.build_step, one code path for both commands)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import timm

from trainer.cli import main
from trainer.run.weights import save_weights

sys.path.append(str(Path(__file__).resolve().parents[1] / "e2e"))  # the e2e data helpers
from multilabel_data import write_tagged_folder

SWEEP = ("--model", "test_resnet", "--imgsz", "16", "--tracker", "none", "--steps", "3", "--seed", "1")
SWEEP += ("--workers", "0", "--exist-ok")


def _losses(name: str) -> list[float]:
    with open(Path("runs/lr_find") / name / "lr_find.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _sweep(name: str, *flags: str) -> list[float]:
    assert main(["lr-find", *SWEEP, "--name", name, *flags]) == 0
    return _losses(name)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_lr_find_on_multilabel_data_starts_at_bce(tmp_path, monkeypatch, capsys):
    """On a labels.csv folder the sweep's first loss is BCE's ln 2 ~ 0.69 (softmax cross-entropy gave 4.76)."""
    monkeypatch.chdir(tmp_path)
    write_tagged_folder(tmp_path / "tagged", count=96)
    first = _sweep("ml", "--data", "tagged", "--batch-size", "32")[0]
    assert 0.6 < first < 0.8, first
    assert "multi-label (a sigmoid per label), loss bce" in capsys.readouterr().out


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_lr_find_follows_class_weights_freeze_and_teacher(tmp_path, monkeypatch, capsys):
    """--class-weights, --freeze and --teacher each change the sweep's losses (they left lr_find.csv identical);
    --freeze without --pretrained says its frozen weights are random."""
    monkeypatch.chdir(tmp_path)
    teacher = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    meta = {"model_name": "test_resnet", "num_classes": "10", "class_names": json.dumps([str(i) for i in range(10)])}
    meta |= {"imgsz": "16", "in_chans": "1", "mean": "[0.5]", "std": "[0.5]"}
    save_weights(teacher.state_dict(), tmp_path / "teacher.safetensors", meta)
    data = ("--data", "digits", "--batch-size", "64", "--lr", "0.1")
    base = _sweep("base", *data)
    weighted = _sweep("weighted", *data, "--class-weights", "inv_freq", "--label-smoothing", "0")
    frozen = _sweep("frozen", *data, "--freeze", "backbone")
    distilled = _sweep("distilled", *data, "--teacher", "test_resnet", "--teacher-weights", "teacher.safetensors")
    out = capsys.readouterr().out
    assert "parameter tensors frozen" in out and "distilling from test_resnet" in out
    assert "warning: --freeze without --pretrained holds randomly initialised weights fixed" in out
    for other in (weighted, frozen, distilled):
        assert other != base
