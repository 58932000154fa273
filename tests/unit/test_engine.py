"""train_one_epoch and evaluate with a real single-process CPU Accelerator on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from trainer.config import CheckpointConfig, OptimConfig, TrainConfig, UserError
from trainer.data import Batch
from trainer.report.reporter import Reporter
from trainer.run.checkpointer import Checkpointer, TrainState
from trainer.train.loop import Loop, evaluate, train_one_epoch
from trainer.train.optim import build_ema, build_optimizer, build_scheduler

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _as_batch(rows: list) -> Batch:
    """Tensor rows as the loop's typed batch, as the data pipeline's loaders yield them."""
    return Batch(torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows]))


@pytest.mark.parametrize("num_batches", [8, 7])
def test_schedule_counts_optimizer_steps_under_grad_accumulation(num_batches, tmp_path):
    grad_accum, batch = 2, 2
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = TensorDataset(torch.randn(num_batches * batch, 4), torch.randint(0, 3, (num_batches * batch,)))
    loader = accelerator.prepare(DataLoader(data, batch_size=batch, collate_fn=_as_batch))
    # As engine.train: the schedule's length in optimizer steps, a trailing partial accumulation included.
    steps_per_epoch = math.ceil(len(loader) / grad_accum)
    assert steps_per_epoch == 4
    cfg = OptimConfig(optimizer="sgd", lr=0.1, min_lr=0.001, warmup_epochs=0, weight_decay=0.0)
    optimizer = build_optimizer(cfg, model)
    raw_optimizer = optimizer
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, epochs=1)
    optimizer_steps = []
    raw_optimizer.register_step_post_hook(lambda *_: optimizer_steps.append(1))
    model, optimizer = accelerator.prepare(model, optimizer)
    # As engine.train: the EMA of the prepared model's unwrapped module; count its updates.
    ema = build_ema(OptimConfig(ema=True, ema_decay=0.5, ema_warmup=False), accelerator.unwrap_model(model))
    ema_steps = []
    update = ema.update
    ema.update = lambda m, step: (ema_steps.append(step), update(m, step=step))

    train_cfg = TrainConfig(grad_accum=grad_accum, label_smoothing=0.0, log_every=100)
    state = TrainState()
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig())
    loop = Loop(accelerator, model, optimizer, scheduler, loader, state, Reporter(accelerator), checkpointer, ema=ema)
    stats = train_one_epoch(loop, train_cfg)

    assert state.step == steps_per_epoch and state.batches_in_epoch == num_batches
    assert len(optimizer_steps) == steps_per_epoch
    assert scheduler.updates == steps_per_epoch
    assert scheduler.get_last_lr()[0] == pytest.approx(cfg.min_lr)  # the schedule ran exactly to its end
    assert stats.images == num_batches * batch
    # The EMA moved once per optimizer update, never on accumulation micro-steps, and lags the trained weights.
    assert ema_steps == list(range(1, steps_per_epoch + 1))
    assert not torch.allclose(ema.module.weight, model.weight)


def test_save_state_carries_schedule_and_ema(tmp_path):
    """What resume relies on: the registered schedule and EMA come back from accelerator.load_state."""
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    model = torch.nn.Linear(4, 3)
    cfg = OptimConfig(optimizer="sgd", lr=0.1, warmup_epochs=0, ema=True, ema_warmup=False)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=10, epochs=1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = build_ema(cfg, accelerator.unwrap_model(model))
    accelerator.register_for_checkpointing(scheduler, ema)
    for step in range(1, 4):
        with torch.no_grad():
            model.weight.add_(1.0)
        scheduler.step()
        ema.update(model, step=step)
    saved_ema, saved_lr = ema.module.weight.detach().clone(), scheduler.get_last_lr()
    accelerator.save_state(str(tmp_path / "state"))
    for _ in range(3):
        scheduler.step()
    ema.set(torch.nn.Linear(4, 3))
    accelerator.load_state(str(tmp_path / "state"))
    assert scheduler.updates == 3 and scheduler.get_last_lr() == pytest.approx(saved_lr)
    torch.testing.assert_close(ema.module.weight, saved_ema)


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
    loader = accelerator.prepare(DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=_as_batch))
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


def _nan_at_batch(bad_batch: int, batches: int = 6, batch: int = 4):
    """A linear model on data whose `bad_batch`-th batch (0-based) holds an inf input: its loss is not finite."""
    torch.manual_seed(0)
    x, y = torch.randn(batches * batch, 4), torch.randint(0, 3, (batches * batch,))
    x[bad_batch * batch] = float("inf")
    return torch.nn.Linear(4, 3), DataLoader(TensorDataset(x, y), batch_size=batch, collate_fn=_as_batch)


@pytest.mark.parametrize("skip", [False, True])
def test_non_finite_loss_stops_or_is_skipped(tmp_path, skip):
    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    model, loader = _nan_at_batch(bad_batch=2)
    cfg = OptimConfig(optimizer="sgd", lr=0.1, warmup_epochs=0, weight_decay=0.0)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=len(loader), epochs=1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState()
    train_cfg = TrainConfig(label_smoothing=0.0, log_every=100, skip_nonfinite=skip)
    args = (accelerator, model, optimizer, scheduler, loader, state, Reporter(accelerator))
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig())
    if not skip:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(UserError, match="non-finite loss at step 3; no checkpoint was saved yet"):
            train_one_epoch(Loop(*args, checkpointer), train_cfg)
        assert state.step == 2
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())  # the bad update never happened
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the good ones did
        return
    stats = train_one_epoch(Loop(*args, checkpointer), train_cfg)
    assert state.skipped_steps == 1 and state.step == len(loader)  # the schedule still advanced
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert math.isfinite(stats.loss)
