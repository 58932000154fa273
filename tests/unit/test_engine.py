"""train_one_epoch and evaluate with a real single-process CPU Accelerator on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from trainer.config import OptimConfig, TrainConfig
from trainer.engine import evaluate, train_one_epoch
from trainer.optim import build_optimizer, build_scheduler
from trainer.tracking import Reporter

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.parametrize("num_batches", [8, 7])
def test_schedule_counts_optimizer_steps_under_grad_accumulation(num_batches):
    grad_accum, batch = 2, 2
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = TensorDataset(torch.randn(num_batches * batch, 4), torch.randint(0, 3, (num_batches * batch,)))
    loader = accelerator.prepare(DataLoader(data, batch_size=batch))
    # As engine.train: the schedule's length in optimizer steps, a trailing partial accumulation included.
    steps_per_epoch = math.ceil(len(loader) / grad_accum)
    assert steps_per_epoch == 4
    cfg = OptimConfig(optimizer="sgd", lr=0.1, min_lr=0.001, warmup_epochs=0, weight_decay=0.0)
    optimizer = build_optimizer(cfg, model)
    raw_optimizer = optimizer
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, epochs=1)
    raw_scheduler = scheduler
    optimizer_steps = []
    raw_optimizer.register_step_post_hook(lambda *_: optimizer_steps.append(1))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    train_cfg = TrainConfig(grad_accum=grad_accum, label_smoothing=0.0, log_every=100)
    stats, step = train_one_epoch(accelerator, model, optimizer, scheduler, loader, train_cfg, 0, Reporter(accelerator))

    assert step == steps_per_epoch
    assert len(optimizer_steps) == steps_per_epoch
    assert raw_scheduler.last_epoch == steps_per_epoch
    assert scheduler.get_last_lr()[0] == pytest.approx(cfg.min_lr)  # the schedule ran exactly to its end
    assert stats.images == num_batches * batch


def test_evaluate_matches_plain_torch():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(10, 4)
    with torch.no_grad():
        logits = model(x)
    predicted = logits.argmax(dim=1)
    # First 6 labels agree with the model's prediction, the last 4 do not: top-1 is 0.6 by construction, and
    # the wrong ones sit in the last, short batch (10 samples in batches of 4: 4, 4, 2).
    y = torch.cat([predicted[:6], (predicted[6:] + 1) % 3])
    loader = accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=4))
    model = accelerator.prepare(model)

    metrics, preds = evaluate(accelerator, model, loader, num_classes=3)

    assert metrics["val/top1"] == pytest.approx(0.6)
    assert metrics["val/top1"] == pytest.approx((predicted == y).float().mean().item())
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert metrics["val/top5"] == 1.0  # top-5 is capped at the 3 classes, so every label is in it
    # Predictions: every sample once, in dataset order, k = min(5, classes).
    assert preds.labels.tolist() == y.tolist()
    assert preds.topk.shape == (10, 3) and preds.topk.dtype == np.int64
    assert preds.predicted.tolist() == predicted.tolist()
    assert preds.loss.dtype == np.float32
    assert preds.loss == pytest.approx(F.cross_entropy(logits, y, reduction="none").numpy(), rel=1e-5)
    assert preds.probs.shape == (10, 3) and (np.diff(preds.probs, axis=1) <= 0).all()  # best first
