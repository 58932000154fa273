"""Training: set up the components of a run, then hand them to the loop (trainer.train.loop.fit). No rank checks here.

train() reads as the steps of a run's set-up, one function each below it (launch, data, model, loaders, optimisation,
run folder and checkpointer, run record). Launch checks live in trainer.train.launch, the loop in trainer.train.loop."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from trainer import data
from trainer.config import Config, UserError
from trainer.data.fingerprint import data_fingerprint
from trainer.report.reporter import Reporter
from trainer.run.checkpointer import Checkpointer, TrainState
from trainer.run.manifest import RunShape
from trainer.run.rundirs import RunFolder, create_run_dir, release_run_dir
from trainer.run.weights import weights_metadata
from trainer.train import autobatch, distill, finetune, optim, stopping
from trainer.train.launch import (
    allow_recompiles,
    build_accelerator,
    check_fsdp_options,
    check_memory,
    emulated_precision_warning,
)
from trainer.train.loop import Loop, fit
from trainer.train.model import SyncBNDecision, apply_sync_bn, build_model, mark_fsdp_blocks, patch_size, size_kwargs
from trainer.train.tasks import Task, build_task, describe_task


def train(cfg: Config, resume_dir: Path | None = None, *, select=None, last: bool = True) -> dict:
    """Run one training job from a validated Config, or continue the run in `resume_dir`. Returns the summary.

    For callers that train several times in one process (trainer.audit's folds): `select` turns the loaded
    `data.Data` into the splits to train and validate on; `last=False` keeps the process group for the next one."""
    start = time.time()
    accelerator, reporter = prepare_launch(cfg, resume_dir)
    # A misspelt --model or a size it cannot take fails before minutes of data preparation (classes and channels
    # do not change whether a size fits).
    size_kwargs(
        cfg.model.model, num_classes=2, in_chans=cfg.model.in_chans or 3, imgsz=cfg.data.imgsz, sizes=other_sizes(cfg)
    )
    backend, dataset = load_data(accelerator, cfg, reporter, select)
    info = dataset.info
    cfg, step = build_step(accelerator, cfg, dataset, reporter, resume_dir)
    model, pre, task, teacher, freeze = step.model, step.pre, step.task, step.teacher, step.freeze
    schedule = data.size_schedule(cfg.data, cfg.train.epochs, patch_size(model))  # None without --progressive
    if schedule is not None and cfg.train.compile:
        allow_recompiles(len(set(schedule.sizes(cfg.train.epochs))) + 1)  # one static graph per size, see there
    # Loaders first, already sharded: the schedule's length comes from this rank's shard of the data.
    spec = data.loader_spec(cfg.data, backend, pre, seed=cfg.train.seed)
    per_device_batch_size = cfg.train.per_device_batch_size(accelerator.num_processes)
    train_loader, val_loader = data.build_loaders(accelerator, dataset, cfg.data, spec, per_device_batch_size, schedule)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum)
    model, optimizer, scheduler, ema = build_optimization(accelerator, cfg, model, steps_per_epoch)
    shape = RunShape(cfg.train.epochs, len(train_loader), cfg.train.grad_accum)
    checkpointer, state = open_run(accelerator, cfg, resume_dir, ema, data_fingerprint(cfg.data, dataset), shape)
    run_dir = checkpointer.run_dir
    test_size = {"test_imgsz": cfg.data.test_imgsz} if cfg.data.test_imgsz else {}  # val/predict/export use it
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
        metadata=weights_metadata(cfg.model.model, info.class_names, pre, **task.weights_metadata(), **test_size),
        num_classes=len(info.class_names),
        teacher=teacher,
        task=task,
        freeze=freeze,
        imgsz=cfg.data.imgsz,
        coverage=None if info.multilabel or cfg.data.streaming else data.ClassCoverage(dataset.train, info.class_names),
    )
    record = run_record(cfg, loop, info, pre, step.sync_bn, steps_per_epoch, backend)
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
    reporter.finish(summary, val_split=dataset.val, end=last)
    release_run_dir(run_dir)
    return summary


@dataclass
class Step:
    """What shapes a training step, built alike for `train` and `lr-find`: the model (SyncBN decided), its
    preprocessing, the task (loss, class weights), the teacher and what --freeze holds."""

    model: torch.nn.Module
    sync_bn: SyncBNDecision
    pre: data.Preprocess
    task: Task
    teacher: distill.Teacher | None
    freeze: finetune.Freeze | None


def build_step(accelerator: Accelerator, cfg: Config, dataset, reporter: Reporter, resume_dir: Path | None = None):
    """(cfg with --batch-size auto resolved, the `Step`): the one way a run's step is built. Every rank."""
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
        if not cfg.model.pretrained:
            reporter.print_once(finetune.RANDOM_BACKBONE)
    return cfg, Step(model, sync_bn, pre, task, teacher, freeze)


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
    check_memory(cfg, accelerator)  # an --imgsz whose first batch cannot fit: one line, before the data loads
    if _fsdp(accelerator):
        check_fsdp_options(cfg)
    reporter = Reporter(accelerator)
    set_seed(cfg.train.seed, device_specific=True, deterministic=cfg.train.deterministic)
    warning = emulated_precision_warning(accelerator)
    if warning:
        reporter.print_once(warning)
    return accelerator, reporter


def load_data(accelerator: Accelerator, cfg: Config, reporter: Reporter, select=None):
    """The backend that decodes and the data: (data.Backend, data.Data: splits + what the run learns), `select`ed
    when given (see train). Every rank."""
    backend = data.choose_backend(cfg.data, accelerator.device.type)  # --loader dali without DALI: refused up front
    if backend.note:
        reporter.print_once(backend.note)
    dataset = data.load_data(accelerator, cfg.data)  # Collective: every rank
    if select is not None:
        dataset = select(dataset)
    info = dataset.info
    if info.skipped:
        reporter.print(data.unreadable_warning(info))
    if info.exclusion:
        reporter.print(info.exclusion)
    for note in info.notes:  # legitimate data that is likely not what was meant: said in the header
        reporter.print(note)
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
    model = build_model(
        cfg.model, num_classes=len(info.class_names), in_chans=in_chans, imgsz=cfg.data.imgsz, sizes=other_sizes(cfg)
    )
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


def other_sizes(cfg: Config) -> dict[int, str]:
    """The sizes besides --imgsz the model must take, each with the flag that asks for it."""
    flags = {"--progressive": cfg.data.progressive, "--test-imgsz": cfg.data.test_imgsz}
    return {px: f"{flag} {px}" for flag, px in flags.items() if px}


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
    size = loop.train_loader.size
    if size is not None:
        reporter.print(size.schedule.describe(cfg.train.epochs))
    if cfg.data.test_imgsz:
        reporter.print(f"evaluation at --test-imgsz {cfg.data.test_imgsz} px (training at {cfg.data.imgsz} px)")
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
    size = loop.train_loader.size
    if size is not None:
        record["dataset"]["imgsz_per_epoch"] = size.schedule.sizes(cfg.train.epochs)
    record["dataset"]["eval_imgsz"] = cfg.data.eval_imgsz
    if loop.teacher is not None:
        record["teacher"] = loop.teacher.record
    return record


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
