"""Logit distillation (train.distill): the loss against a hand computation and against timm's LogitDistillationTask,
the frozen teacher built from a trainer weights file, its renormalised inputs, and its refusals."""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

from trainer.config import DataConfig, DistillConfig, UserError, build_config
from trainer.data import Preprocess
from trainer.run.weights import save_weights
from trainer.train.distill import Teacher, build_teacher, distill_loss
from trainer.train.launch import check_fsdp_options

CLASSES = [str(i) for i in range(10)]


def _hand_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T^2 x mean over rows of sum_c p_t(c) log(p_t(c) / p_s(c)), softmaxes at T written out."""

    def softmax(z):
        e = np.exp(z / temperature - (z / temperature).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_s, p_t = softmax(student.astype(np.float64)), softmax(teacher.astype(np.float64))
    return float(temperature**2 * (p_t * np.log(p_t / p_s)).sum(axis=1).mean())


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distill_loss_matches_a_hand_computation(temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    got = distill_loss(torch.tensor(student), torch.tensor(teacher), temperature).item()
    assert got == pytest.approx(_hand_kd(student, teacher, temperature), rel=1e-5)
    assert distill_loss(torch.tensor(teacher), torch.tensor(teacher), temperature).item() == pytest.approx(0, abs=1e-6)


def test_mixed_loss_equals_timms_logit_distillation_task():
    """Our (1 - alpha) x CE + alpha x T^2 KL is timm's LogitDistillationTask with complementary weights."""
    from timm.task.distillation import LogitDistillationTask

    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=10).eval()
    teacher_model = timm.create_model("test_efficientnet", num_classes=10).eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 7, 9])
    alpha, temperature = 0.7, 3.0
    task = LogitDistillationTask(
        student, teacher_model, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=1 - alpha,
        temperature=temperature, verbose=False,
    )  # fmt: skip
    # timm renormalises the batch from the student's mean/std to the teacher's, as ours does.
    s_mean, s_std = (torch.tensor(student.pretrained_cfg[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    t_mean, t_std = (torch.tensor(teacher_model.pretrained_cfg[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    ours = Teacher(
        teacher_model, alpha, temperature, contextlib.nullcontext, {}, s_std / t_std, (s_mean - t_mean) / t_std
    )
    logits = student(images)
    expected = task(images, labels)["loss"]
    assert ours.mix(F.cross_entropy(logits, labels), logits, images).item() == pytest.approx(expected.item(), rel=1e-5)


def _teacher_file(tmp_path, mean=(0.5,), **meta):
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1).eval()
    metadata = {"model_name": "test_resnet", "num_classes": "10", "class_names": '["' + '", "'.join(CLASSES) + '"]'}
    metadata |= {"imgsz": "16", "in_chans": "1", "mean": f"[{mean[0]}]", "std": "[0.5]", **meta}
    path = tmp_path / "teacher.safetensors"
    save_weights(model.state_dict(), path, metadata)
    return model, path


def _build(path, pre, resume_dir=None, **cfg):
    cfg = DistillConfig(teacher="test_resnet", teacher_weights=str(path), **cfg)
    return build_teacher(
        cfg, DataConfig(imgsz=16), torch.device("cpu"), contextlib.nullcontext, CLASSES, pre, resume_dir
    )


def test_teacher_from_a_run_file_is_frozen_renormalised_and_recorded(tmp_path):
    source, path = _teacher_file(tmp_path)
    pre = Preprocess(16, 1, (0.449,), (0.226,), "bilinear", 0.875)  # the student's: ImageNet's, averaged to 1 channel
    teacher = _build(path, pre, distill_alpha=0.25, distill_temperature=2.0)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    raw = torch.rand(3, 1, 16, 16)
    student_batch = (raw - 0.449) / 0.226
    with torch.no_grad():
        expected = source((raw - 0.5) / 0.5)  # what the teacher saw in its own run
    torch.testing.assert_close(teacher.logits(student_batch), expected, rtol=1e-4, atol=1e-4)
    record = teacher.record
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (record["model"], record["alpha"], record["temperature"], record["mean"]) == (
        "test_resnet",
        0.25,
        2.0,
        [0.5],
    )
    assert "renormalised" in teacher.describe() and record["sha256"][:12] in teacher.describe()

    # The student's gradient only: nothing reaches the teacher.
    student = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    logits = student(student_batch)
    teacher.mix(F.cross_entropy(logits, torch.tensor([1, 2, 3])), logits, student_batch).backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_teacher_with_the_students_normalisation_sees_the_batch_unchanged(tmp_path):
    _, path = _teacher_file(tmp_path)
    teacher = _build(path, Preprocess(16, 1, (0.5,), (0.5,), "bilinear", 0.875))
    assert teacher.scale is None and "renormalised" not in teacher.describe()


def test_resumed_run_refuses_a_teacher_file_that_changed(tmp_path):
    _, path = _teacher_file(tmp_path)
    pre = Preprocess(16, 1, (0.5,), (0.5,), "bilinear", 0.875)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"teacher": {"sha256": _build(path, pre).record["sha256"]}}))
    assert _build(path, pre, resume_dir=run_dir) is not None  # the same file: fine
    _teacher_file(tmp_path, mean=(0.4,))  # rewritten in place
    with pytest.raises(UserError, match=r"--resume: the teacher's weights .* changed since the run started"):
        _build(path, pre, resume_dir=run_dir)


def test_teacher_is_refused_under_fsdp():
    cfg = build_config({"distill": {"teacher": "resnet18", "teacher_pretrained": True}})
    with pytest.raises(UserError, match="--teacher does not work with FSDP"):
        check_fsdp_options(cfg)


def test_no_teacher_no_distillation():
    assert (
        build_teacher(DistillConfig(), DataConfig(), torch.device("cpu"), contextlib.nullcontext, CLASSES, None) is None
    )
