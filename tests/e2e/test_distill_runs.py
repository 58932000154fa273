"""Distillation for real: a teacher trained here, students distilled from its best.safetensors, 1 process and 2 gloo
ranks; the students' weights load strictly into plain timm and hold no teacher tensor, nor do their checkpoints."""

from __future__ import annotations

import hashlib
import importlib.util
import math
from pathlib import Path

import pytest
import timm
from conftest import CPU_2PROC, accelerate_launch, check, config_of, results, run, trainer
from safetensors import safe_open
from safetensors.torch import load_file

FAST = ("--data", "digits", "--imgsz", "16", "--batch-size", "64", "--tracker", "none", "--workers", "0")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A test_resnet trained 2 epochs on digits (about 0.9 top-1); its best.safetensors."""
    root = tmp_path_factory.mktemp("teacher")
    (root / "home").mkdir()
    check(run(trainer("train", *FAST, "--epochs", "2", "--model", "test_resnet", "--name", "teacher"), root))
    return root / "runs" / "train" / "teacher" / "weights" / "best.safetensors"


def _student_files_are_plain_timm(run_dir: Path, model: str) -> None:
    """best.safetensors loads strictly into timm.create_model; every checkpoint's model file has the same keys."""
    student = timm.create_model(model, num_classes=10, in_chans=1)
    student.load_state_dict(load_file(run_dir / "weights" / "best.safetensors"), strict=True)
    keys = set(student.state_dict())
    checkpoints = sorted((run_dir / "checkpoints").glob("*/model.safetensors"))
    assert checkpoints
    for path in checkpoints:
        with safe_open(str(path), framework="pt") as f:
            assert set(f.keys()) == keys, path
    assert not any("teacher" in p.name for p in run_dir.rglob("*"))


def test_student_learns_from_the_teacher_alone(workdir: Path, teacher: Path):
    """alpha 1: the labels never reach the loss, so what the student learns came from the teacher. Another model
    with another normalisation (test_efficientnet: ImageNet mean/std; test_resnet: 0.5) gets renormalised inputs."""
    digest = hashlib.sha256(teacher.read_bytes()).hexdigest()
    args = ("--model", "test_efficientnet", "--epochs", "2", "--teacher", "test_resnet", "--teacher-weights")
    proc = check(
        run(trainer("train", *FAST, *args, str(teacher), "--distill-alpha", "1", "--distill-temperature", "2"), workdir)
    )
    run_dir = workdir / "runs" / "train" / "exp"
    assert f"distilling from test_resnet ({teacher}, sha256 {digest[:12]}" in proc.stdout
    assert "renormalised" in proc.stdout
    rows = results(run_dir)
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert float(rows[-1]["val/top1"]) >= 0.5, rows  # chance is 0.1
    record = config_of(run_dir)
    assert record["teacher"]["sha256"] == digest and record["teacher"]["model"] == "test_resnet"
    assert record["distill"] == {
        "teacher": "test_resnet", "teacher_weights": str(teacher), "teacher_pretrained": False,
        "distill_alpha": 1.0, "distill_temperature": 2.0,
    }  # fmt: skip
    _student_files_are_plain_timm(run_dir, "test_efficientnet")
    assert hashlib.sha256(teacher.read_bytes()).hexdigest() == digest  # the teacher's file is left as it was


# DALI (an optional extra, `.[dali]`) where installed: its batches reach the loop as the same Batch.
LOADER = "dali" if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.dali") else "torch"


def test_two_ranks_distil_with_mixup(workdir: Path, teacher: Path):
    """2 gloo ranks, each with its own unprepared teacher; the KL term on the mixed images."""
    args = ("--model", "test_resnet", "--epochs", "2", "--mixup", "0.2", "--loader", LOADER, "--teacher", "test_resnet")
    check(run(accelerate_launch(CPU_2PROC, "train", *FAST, *args, "--teacher-weights", str(teacher)), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    record = config_of(run_dir)
    assert record["launch"]["num_processes"] == 2 and record["launch"]["backend"] == "gloo"
    assert record["launch"]["loader"] == LOADER
    assert record["teacher"]["alpha"] == 0.5
    rows = results(run_dir)
    assert len(rows) == 2 and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert float(rows[-1]["val/top1"]) >= 0.4, rows
    _student_files_are_plain_timm(run_dir, "test_resnet")
