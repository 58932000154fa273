"""The training loop: fit() = train_one_epoch() + evaluate() per epoch, on the prepared components of one `Loop`.

No rank checks here: every rank runs every line, and each collective is marked where it is called. The set-up that
builds a `Loop` is trainer.train.engine.train; checkpoints live in trainer.run.checkpointer, weight files in
trainer.run.weights."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from trainer import data
from trainer.config import TrainConfig
from trainer.report.evaluation import Predictions
from trainer.report.metrics import MultiLabelPredictions, multilabel_metrics, single_label_metrics
from trainer.report.reporter import KEPT, Reporter
from trainer.run.checkpointer import Checkpointer, TrainState
from trainer.run.finite import BufferSnapshot
from trainer.run.layout import WEIGHTS
from trainer.run.weights import save_epoch_weights
from trainer.run.writes import disk_errors
from trainer.train import distill, finetune, optim, stopping
from trainer.train.model import has_batchnorm
from trainer.train.tasks import Task, restore_best


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    classes: list[int] | None = None  # samples per class over all ranks, for a whole epoch (not a resumed one)


@dataclass
class Loop:
    """What the training loop works on: the prepared components, its position, where it reports and saves."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: optim.Schedule
    train_loader: data.Loader  # this rank's shard
    state: TrainState
    reporter: Reporter
    checkpointer: Checkpointer
    val_loader: data.Loader | None = None
    ema: Any = None  # the weight average (timm ModelEmaV3), None without --ema
    run_dir: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # of the weight files (weights_metadata)
    num_classes: int = 0
    teacher: distill.Teacher | None = None  # --teacher: frozen, on the device, never prepared nor saved
    task: Task | None = None  # the loss and the best metric (trainer.train.tasks); None: single-label defaults
    freeze: finetune.Freeze | None = None  # --freeze: what is frozen until which epoch
    coverage: data.ClassCoverage | None = None  # single-label map-style data: stop when a class lost every image
    imgsz: int = 0  # the training size (--imgsz); under --progressive the train loader's size of the epoch


def fit(loop: Loop, cfg: TrainConfig) -> tuple[float, int]:
    """Train from `loop.state` to cfg.epochs; evaluate, save weights and a checkpoint after each epoch.

    "Best" is one comparison, `task.best` (--best-metric: a metric name and a mode), for best.safetensors and the
    plateau schedule alike. With an EMA (`loop.ema`), the average is evaluated too and best.safetensors takes
    whichever of the two scores better. Returns (the best value, its epoch)."""
    accelerator, model, ema, state, reporter = loop.accelerator, loop.model, loop.ema, loop.state, loop.reporter
    scheduler, train_loader, val_loader = loop.scheduler, loop.train_loader, loop.val_loader
    task = loop.task or Task(multilabel=False, num_classes=loop.num_classes)
    best = task.best
    restore_best(state, best)
    average_bn = accelerator.num_processes > 1 and has_batchnorm(model)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if stopping.already_stopped(state):  # resumed after it had stopped early
            break
        train_loader.set_epoch(epoch)
        finetune.set_epoch(accelerator.unwrap_model(model), loop.freeze, epoch)  # after prepare: see finetune
        reporter.epoch_start(epoch, cfg.epochs, len(train_loader) - state.batches_in_epoch)
        stats = train_one_epoch(loop, cfg)
        if stats.classes is not None:  # loop.coverage counted a whole epoch: the same sums and reads on every rank
            loop.coverage.check(stats.classes, epoch, loop.run_dir)
        if average_bn:
            sync_bn_stats(accelerator, model)
            if ema is not None:  # each rank averaged its own running statistics into its EMA
                sync_bn_stats(accelerator, ema.module)
        metrics, preds = evaluate(accelerator, model, val_loader, loop.num_classes, task)
        if ema is not None:
            ema_metrics, ema_preds = evaluate(accelerator, ema.module, val_loader, loop.num_classes, task)
            metrics |= {f"{k}_ema": v for k, v in ema_metrics.items()}
        scheduler.end_epoch(epoch, best.plateau_value(metrics[best.key]))
        imgsz = train_loader.imgsz or loop.imgsz  # the epoch's training size (--progressive: the schedule's)
        metrics = {"imgsz": imgsz, "train/loss": stats.loss, **metrics, "lr": scheduler.get_last_lr()[0]}
        use_ema = ema is not None and best.better(metrics[f"{best.key}_ema"], metrics[best.key])
        source = "ema" if use_ema else "model"
        value = metrics[f"{best.key}_ema" if use_ema else best.key]
        is_best = best.better(value, state.best_value)
        if is_best:
            state.best_value, state.best_metric, state.best_epoch = value, best.key, epoch
            if not task.multilabel:  # kept for readers of older checkpoints and summaries
                state.best_top1 = metrics["val/top1_ema" if use_ema else "val/top1"]
        reporter.log({**metrics, "epoch": epoch}, step=state.step)
        best_preds = ema_preds if use_ema else preds
        reporter.epoch_end(epoch, cfg.epochs, metrics, stats.seconds, stats.images / stats.seconds, is_best, best_preds)
        name = best.key.replace("/", "_")
        meta = {**loop.metadata, "epoch": str(epoch), name: f"{metrics[best.key]:.6f}", "weights": "model"}
        if "val/top1" in metrics:
            meta["val_top1"] = f"{metrics['val/top1']:.6f}"
        best_meta = {**meta, name: f"{value:.6f}", "weights": source, "best_metric": best.key}
        if use_ema and "val/top1_ema" in metrics:
            best_meta["val_top1"] = f"{metrics['val/top1_ema']:.6f}"
        best_model = ema.module if use_ema else model
        with disk_errors(loop.run_dir / WEIGHTS, KEPT):  # a full or read-only disk: one line, earlier files kept
            save_epoch_weights(
                accelerator, model, loop.run_dir / WEIGHTS, meta, is_best, best_model, best_meta, step=state.step
            )
        state.epoch, state.batches_in_epoch, state.loss_sum, state.seen = epoch, 0, 0.0, 0.0
        # Collective: every rank saves its part; then all stop together if any of them got a signal.
        stop_early = stopping.count_epoch(state, epoch, is_best, cfg.patience, cfg.unfreeze_epoch)  # see there
        loop.checkpointer.end_epoch(state, final=epoch == cfg.epochs or stop_early)
        if stop_early:
            reporter.print(stopping.reason(state, cfg.patience))
            break
    return state.best_value if state.best_value is not None else float("nan"), state.best_epoch


def train_one_epoch(loop: Loop, cfg: TrainConfig) -> EpochStats:
    """One pass over this rank's shard (its rest, when resumed mid-epoch), advancing `loop.state`.

    Returns the epoch's mean loss over all ranks. One piece on purpose (about a screen): a step's order (forward,
    backward, the ranks' agreement, update, schedule, EMA, saves) reads top to bottom."""
    accelerator, model, optimizer, scheduler = loop.accelerator, loop.model, loop.optimizer, loop.scheduler
    state, reporter, checkpointer, ema = loop.state, loop.reporter, loop.checkpointer, loop.ema
    loader = loop.train_loader
    task = loop.task or Task(multilabel=False, num_classes=loop.num_classes, label_smoothing=cfg.label_smoothing)
    model.train()
    finetune.hold_frozen_bn(model)
    start = time.time()
    # Resumed mid-epoch: this rank's partial sums come from the checkpoint and its first batches are skipped.
    loss_sum = torch.tensor(state.loss_sum, device=accelerator.device)
    seen = torch.tensor(state.seen, device=accelerator.device)
    trained = torch.zeros((), device=accelerator.device)  # images this session, for img/s
    whole_epoch = loop.coverage is not None and not state.batches_in_epoch
    classes = torch.zeros(loop.num_classes if whole_epoch else 0, device=accelerator.device)  # samples per class
    if state.batches_in_epoch:
        loader = loader.skip(accelerator, state.batches_in_epoch)
    nonfinite = torch.zeros((), device=accelerator.device)
    stop = False
    # A skipped update must leave no trace: its forwards already moved the BatchNorm statistics.
    buffers = BufferSnapshot(model) if cfg.skip_nonfinite else None
    for batch in loader:
        images, labels = batch.images, batch.labels
        with accelerator.accumulate(model):
            if buffers is not None:
                buffers.take()  # before the window's first forward; a no-op for its later micro-batches
            logits = model(images)
            # labels are class indices, or class probabilities when --mixup/--cutmix mixed the batch
            loss = task.loss(logits, labels)
            if loop.teacher is not None:  # --teacher: its softened logits on the same (mixed) images join the loss
                loss = loop.teacher.mix(loss, logits, images)
            accelerator.backward(loss)
            finite = torch.isfinite(loss.detach())
            nonfinite += ~finite
            if accelerator.sync_gradients:
                # Collective: all ranks agree whether to skip this update and whether to stop after it.
                skip, stop = checkpointer.check_step(nonfinite, state.step + 1, cfg.skip_nonfinite)
                if skip:
                    buffers.restore()
                    state.skipped_steps += 1
                    reporter.print(f"step {state.step + 1}: non-finite loss, update skipped ({state.skipped_steps})")
                else:
                    if cfg.clip_grad > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                    if buffers is not None:
                        buffers.release()
                optimizer.zero_grad(set_to_none=True)
                nonfinite.zero_()
        loss_sum += torch.where(finite, loss.detach(), 0.0) * labels.shape[0]
        seen += finite * labels.shape[0]
        trained += labels.shape[0]
        if whole_epoch:
            classes += data.present(labels, loop.num_classes)
        state.batches_in_epoch += 1
        reporter.advance(labels.shape[0] * accelerator.num_processes)
        if accelerator.sync_gradients:
            scheduler.step()
            state.step += 1
            if ema is not None:  # once per optimizer update, not per accumulation micro-step
                ema.update(accelerator.unwrap_model(model), step=state.step)
            if state.step % cfg.log_every == 0:
                reporter.log_train(state.step, loss.item(), scheduler.get_last_lr()[0])
            if stop:  # Collective: every rank saves its part, then raises Stopped
                checkpointer.stop(state, loss_sum, seen)
            if checkpointer.due(state.step, accelerator.gradient_state.end_of_dataloader):
                checkpointer.save(state, loss_sum, seen)  # Collective: every rank saves its part
    # Collective: every rank contributes its sums (and its samples per class).
    sums = accelerator.reduce(torch.cat([torch.stack([loss_sum, seen, trained]), classes]), reduction="sum")
    loss_sum, seen, trained = sums[:3]
    counts = [int(n) for n in sums[3:].tolist()] if whole_epoch else None
    return EpochStats((loss_sum / seen).item(), int(trained.item()), time.time() - start, counts)


@torch.no_grad()
def evaluate(accelerator, model, loader, num_classes: int, task: Task | None = None):
    """Validation metrics over the whole set, and every sample's predictions in dataset order: loss, top-1, top-5,
    macro-F1 and balanced accuracy (single-label, `report.Predictions`), or loss, mAP, micro/macro F1 (multi-label,
    `metrics.MultiLabelPredictions`). Every rank gets the same full result: each sample counted once across ranks.
    """
    task = task or Task(multilabel=False, num_classes=num_classes)
    model.eval()
    k = min(5, num_classes)
    parts: list[tuple[torch.Tensor, ...]] = []
    for batch in loader:
        images, labels = batch.images, batch.labels
        with accelerator.autocast():  # the EMA copy is not prepared, so it has no autocast of its own
            logits = model(images).float()
        loss = task.sample_loss(logits, labels)
        if task.multilabel:
            outputs = (labels.to(torch.int8), logits.sigmoid(), loss)
        else:
            probs, topk = logits.softmax(dim=1).topk(k, dim=1)
            outputs = (labels, topk, loss, probs)
        # Collective: gather_for_metrics drops the samples padded onto the last batch of the shards; the
        # unshuffled loader hands ranks consecutive batches, so the gathered rows come in dataset order.
        parts.append(accelerator.gather_for_metrics(outputs))
    columns = [torch.cat(column).cpu().numpy() for column in zip(*parts, strict=True)]
    if task.multilabel:
        targets, scores, loss = columns
        preds = MultiLabelPredictions(targets, scores.astype(np.float32), loss.astype(np.float32), task.threshold)
        return multilabel_metrics(preds), preds
    labels, topk, loss, probs = columns
    preds = Predictions(
        labels=labels.astype(np.int64), topk=topk.astype(np.int64), loss=loss.astype(np.float32), probs=probs
    )
    correct = preds.topk == preds.labels[:, None]
    values = {
        "val/loss": float(preds.loss.astype(np.float64).mean()),
        "val/top1": float(correct[:, 0].mean()),
        "val/top5": float(correct.any(axis=1).mean()),
        **single_label_metrics(preds.labels, preds.predicted, num_classes),
    }
    return values, preds


def sync_bn_stats(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks so every rank evaluates and saves the same model."""
    from timm.utils import distribute_bn

    # Collective (all_reduce): every rank calls it.
    distribute_bn(model, accelerator.num_processes, reduce=True)
