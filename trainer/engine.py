"""Training: set up the components, then fit() = train_one_epoch() + evaluate() per epoch. No rank checks here.

train() reads as the steps of a run's set-up, one function each below it (launch, data, model, loaders, optimisation,
run folder and checkpointer, run record); fit() and train_one_epoch() take the loop's inputs as one `Loop`.
Launch checks live in trainer.launch, checkpoints in trainer.checkpointer, weight files in trainer.weights."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from trainer import autobatch, data, distill, finetune, optim, stopping
from trainer.checkpointer import Checkpointer, TrainState
from trainer.config import Config, TrainConfig, UserError
from trainer.data.fingerprint import data_fingerprint
from trainer.files import WEIGHTS
from trainer.finite import BufferSnapshot
from trainer.integrity import RunShape
from trainer.launch import build_accelerator, check_fsdp_options, emulated_precision_warning
from trainer.metrics import MultiLabelPredictions, multilabel_metrics, single_label_metrics
from trainer.model import apply_sync_bn, build_model, has_batchnorm, mark_fsdp_blocks, size_kwargs
from trainer.report import Predictions
from trainer.rundirs import RunFolder, create_run_dir, release_run_dir
from trainer.tasks import Task, build_task, describe_task, restore_best
from trainer.tracking import KEPT, Reporter
from trainer.weights import save_epoch_weights, weights_metadata
from trainer.writes import disk_errors


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
    task: Task | None = None  # the loss and the best metric (trainer.tasks); None: single-label defaults
    freeze: finetune.Freeze | None = None  # --freeze: what is frozen until which epoch
    coverage: data.ClassCoverage | None = None  # single-label map-style data: stop when a class lost every image


def train(cfg: Config, resume_dir: Path | None = None) -> dict:
    """Run one training job from a validated Config, or continue the run in `resume_dir`. Returns the summary."""
    start = time.time()
    accelerator, reporter = prepare_launch(cfg, resume_dir)
    # A misspelt --model or a size it cannot take fails before minutes of data preparation (classes and channels
    # do not change whether a size fits).
    size_kwargs(cfg.model.model, num_classes=2, in_chans=cfg.model.in_chans or 3, imgsz=cfg.data.imgsz)
    backend, dataset = load_data(accelerator, cfg, reporter)
    info = dataset.info
    task = build_task(cfg.train, info.multilabel, len(info.class_names), _train_counts(cfg, dataset))
    model, sync_bn, pre = build_model_side(accelerator, cfg, info, reporter)
    if info.multilabel and cfg.distill.teacher:
        raise UserError(
            "--teacher: logit distillation is single-label (a softmax over classes) and this data is "
            "multi-label; drop --teacher"
        )
    teacher = distill.build_teacher(
        cfg.distill, cfg.data, accelerator.device, accelerator.autocast, info.class_names, pre, resume_dir
    )
    cfg, line = autobatch.resolve_config(cfg, accelerator, model, info)  # --batch-size auto -> a number
    if line:
        reporter.print_once(line)
    freeze = finetune.plan_freeze(cfg.train, model, _fsdp(accelerator))  # names of the unwrapped model
    if freeze is not None:
        reporter.print_once(finetune.describe(freeze, cfg.train))
    # Loaders first, already sharded: the schedule's length comes from this rank's shard of the data.
    spec = data.loader_spec(cfg.data, backend, pre, seed=cfg.train.seed)
    per_device_batch_size = cfg.train.per_device_batch_size(accelerator.num_processes)
    train_loader, val_loader = data.build_loaders(accelerator, dataset, cfg.data, spec, per_device_batch_size)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum)
    model, optimizer, scheduler, ema = build_optimization(accelerator, cfg, model, steps_per_epoch)
    shape = RunShape(cfg.train.epochs, len(train_loader), cfg.train.grad_accum)
    checkpointer, state = open_run(accelerator, cfg, resume_dir, ema, data_fingerprint(cfg.data, dataset), shape)
    run_dir = checkpointer.run_dir
    loop = Loop(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        state=state,
        reporter=reporter,
        checkpointer=checkpointer,
        val_loader=val_loader,
        ema=ema,
        run_dir=run_dir,
        metadata=weights_metadata(cfg.model.model, info.class_names, pre, **task.weights_metadata()),
        num_classes=len(info.class_names),
        teacher=teacher,
        task=task,
        freeze=freeze,
        coverage=None if info.multilabel or cfg.data.streaming else data.ClassCoverage(dataset.train, info.class_names),
    )
    record = run_record(cfg, loop, info, pre, sync_bn, steps_per_epoch, backend)
    start_run(loop, cfg, record, info, resumed=resume_dir is not None)
    with checkpointer:  # SIGTERM/SIGINT from here on: finish the step, save, exit
        best = fit(loop, cfg.train)
    # Collective: tear the process group down together; a rank that leaves while rank 0 still writes files
    # was seen to abort in gloo at exit ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    summary = {
        "best/metric": task.best.key,
        "best/value": best[0],
        "best/epoch": best[1],
        "time_s": time.time() - start,
        "run_dir": str(run_dir),
    }
    if not task.multilabel:
        summary["best/val_top1"] = state.best_top1
    if state.skipped_steps:
        summary["train/skipped_steps"] = state.skipped_steps
    if state.stopped_epoch:
        summary["early_stop/epoch"] = state.stopped_epoch
        summary["early_stop/reason"] = stopping.reason(state, cfg.train.patience)
    reporter.finish(summary, val_split=dataset.val)
    release_run_dir(run_dir)
    return summary


def _train_counts(cfg: Config, dataset) -> np.ndarray | None:
    """Images per class of the training split, for --class-weights (a stream is not counted: None)."""
    if cfg.train.class_weights == "none" or cfg.data.streaming:
        return None
    return data.label_counts(dataset.train, dataset.info)


def _fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def prepare_launch(cfg: Config, resume_dir: Path | None) -> tuple[Accelerator, Reporter]:
    """The Accelerator (the launch checked), the Reporter and the seeds, before anything is read or written."""
    accelerator = build_accelerator(cfg, resume_dir)
    if _fsdp(accelerator):
        check_fsdp_options(cfg)
    reporter = Reporter(accelerator)
    set_seed(cfg.train.seed, device_specific=True, deterministic=cfg.train.deterministic)
    warning = emulated_precision_warning(accelerator)
    if warning:
        reporter.print_once(warning)
    return accelerator, reporter


def load_data(accelerator: Accelerator, cfg: Config, reporter: Reporter):
    """The backend that decodes and the data: (data.Backend, data.Data: splits + what the run learns). Every rank."""
    backend = data.choose_backend(cfg.data, accelerator.device.type)  # --loader dali without DALI: refused up front
    if backend.note:
        reporter.print_once(backend.note)
    dataset = data.load_data(accelerator, cfg.data)  # Collective: every rank
    info = dataset.info
    if info.skipped:
        reporter.print(data.unreadable_warning(info))
    world = accelerator.num_processes
    per_device_batch_size = cfg.train.per_device_batch_size(world)
    if info.train_size < per_device_batch_size * world:
        raise UserError(
            f"--batch-size {cfg.train.batch_size} needs at least {per_device_batch_size * world} training images per "
            f"step but the data has {info.train_size}; lower --batch-size"
        )
    return backend, dataset


def build_model_side(accelerator: Accelerator, cfg: Config, info, reporter: Reporter):
    """The timm model (SyncBN decided and applied, FSDP blocks marked), the SyncBN decision, its preprocessing."""
    in_chans = cfg.model.in_chans or info.channels
    model = build_model(cfg.model, num_classes=len(info.class_names), in_chans=in_chans, imgsz=cfg.data.imgsz)
    # SyncBN before the optimizer and prepare(), so both see the final layer types.
    model, sync_bn = apply_sync_bn(model, cfg.model.sync_bn, accelerator.num_processes, accelerator.device.type)
    if cfg.model.sync_bn and not sync_bn.applied:
        reporter.print_once(f"--sync-bn skipped: {sync_bn.reason}; training with plain BatchNorm")
    if _fsdp(accelerator) and not mark_fsdp_blocks(model):
        reporter.print_once(
            f"FSDP: {cfg.model.model} has no blocks to shard one by one; it is one unit, gathered whole"
        )
    pre = data.resolve_preprocess(cfg.data, model, in_chans)
    return model, sync_bn, pre


def build_optimization(accelerator: Accelerator, cfg: Config, model, steps_per_epoch: int):
    """Optimizer, schedule and EMA, with the model and optimizer prepared: (model, optimizer, scheduler, ema)."""
    fsdp = _fsdp(accelerator)
    optimizer = optim.build_optimizer(cfg.optim, model)
    scheduler = optim.build_scheduler(cfg.optim, optimizer, steps_per_epoch, cfg.train.epochs)
    # A sharded model cannot be deep-copied: under FSDP the average is copied before prepare, then sharded like it.
    ema = optim.build_ema(cfg.optim, model) if cfg.optim.ema and fsdp else None
    # Under FSDP2 this shards the model (one unit per block) and swaps the optimizer's parameters for the shards.
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        optim.shard_ema(accelerator, ema)
    elif cfg.optim.ema:
        # From the unwrapped model after SyncBN and device placement: the same layer types, on the same device.
        ema = optim.build_ema(cfg.optim, accelerator.unwrap_model(model))
    # save_state/load_state carry these too (the timm schedule is no torch LRScheduler for prepare to wrap). A sharded
    # EMA is not among them (accelerate saves registered objects from the main process only): the Checkpointer
    # saves its shards on every rank.
    accelerator.register_for_checkpointing(scheduler, *([ema] if ema is not None and not fsdp else []))
    return model, optimizer, scheduler, ema


def open_run(
    accelerator: Accelerator, cfg: Config, resume_dir: Path | None, ema, fingerprint: dict, shape: RunShape
) -> tuple[Checkpointer, TrainState]:
    """The run folder (a new one, or `resume_dir`), its Checkpointer and the loop's state. Every rank.
    `fingerprint`: the data's, kept in every checkpoint; `shape`: what a checkpoint's position must fit.

    Called after everything stateful is prepared or registered for checkpointing: load_state restores exactly those."""
    folder = RunFolder(cfg.run.project, cfg.run.name, cfg.run.exist_ok)
    # Locked by the main process for the run's life: a second train/--resume/--exist-ok on it is refused.
    run_dir = create_run_dir(accelerator, folder, existing=resume_dir)  # Collective: every rank, one decision
    fsdp = _fsdp(accelerator)
    checkpointer = Checkpointer(
        accelerator,
        run_dir,
        cfg.checkpoint,
        rank_local={"ema": ema.module} if ema is not None else None,
        sharded={"ema": ema.module} if ema is not None and fsdp else None,
        fingerprint=fingerprint,
    )
    state = checkpointer.restore(cfg.train.epochs, shape) if resume_dir else TrainState()
    return checkpointer, state


def start_run(loop: Loop, cfg: Config, record: dict, info, resumed: bool) -> None:
    """Write the run record and start the trackers (the Reporter: main process only); print the run's header."""
    accelerator, reporter, world = loop.accelerator, loop.reporter, loop.accelerator.num_processes
    reporter.start(loop.run_dir, record, cfg.run, resume=resumed)
    reporter.print(
        f"{cfg.model.model} on {info.source} ({info.train_size} train / {info.val_size} val, "
        f"{len(info.class_names)} {'labels, multi-label' if info.multilabel else 'classes'}), "
        f"{world} process(es) on {accelerator.device.type}, "
        f"global batch {cfg.train.batch_size} = {cfg.train.per_device_batch_size(world)} x {world} x "
        f"{cfg.train.grad_accum}, precision {accelerator.mixed_precision}"
    )
    reporter.print(data.describe_augmentation(cfg.data, info))
    if loop.teacher is not None:
        reporter.print(loop.teacher.describe())
    if loop.task is not None:
        reporter.print(describe_task(loop.task, cfg.train.class_weights, cfg.data.balanced_sampler))
    if resumed:
        reporter.keep_results(loop.state.epoch)  # rows written after the checkpoint are trained again
        reporter.print(f"resuming {loop.run_dir} at epoch {loop.state.epoch + 1}, step {loop.state.step}")


def run_record(cfg: Config, loop: Loop, info, pre, sync_bn, steps_per_epoch: int, backend) -> dict:
    """The resolved config plus the facts of this launch and dataset, as written to config.yaml and trackers."""
    accelerator = loop.accelerator
    record = cfg.to_dict()
    record["launch"] = {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).removeprefix("DistributedType."),
        "mixed_precision": accelerator.mixed_precision,
        "device": accelerator.device.type,
        "device_name": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu",
        "backend": accelerator.state.backend or "",
        "sync_bn": sync_bn.applied,
        "sync_bn_reason": sync_bn.reason,
        "sync_bn_layers": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in loop.model.modules()),  # after prepare
        "per_device_batch_size": cfg.train.per_device_batch_size(accelerator.num_processes),
        "steps_per_epoch": steps_per_epoch,
        "workers": loop.train_loader.num_workers,
        "dynamo_backend": str(accelerator.state.dynamo_plugin.backend.value).lower(),
        "fused_optimizer": any(g.get("fused") for g in loop.optimizer.param_groups),
        # The classes FSDP wrapped, as prepare() resolved them (ours, or the launch config's own list).
        "fsdp_blocks": list(accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap or [])
        if _fsdp(accelerator)
        else [],
        "versions": _versions(),
        "loader": backend.name,
        "loader_reason": backend.reason,
    }
    record["dataset"] = data.dataset_record(cfg.data, info, pre)
    if loop.teacher is not None:
        record["teacher"] = loop.teacher.record
    return record


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
        if loop.coverage is not None and stats.classes is not None:  # the same sums and reads on every rank
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
        metrics = {"train/loss": stats.loss, **metrics, "lr": scheduler.get_last_lr()[0]}
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
        stop_early = stopping.count_epoch(state, epoch, is_best, cfg.patience)  # same on every rank: see there
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


def _versions() -> dict[str, str]:
    import accelerate
    import datasets
    import timm

    return {
        "torch": str(torch.__version__),
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
    }
