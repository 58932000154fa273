"""Training: set up the components, then fit() = train_one_epoch() + evaluate() per epoch. No rank checks here."""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import DistributedType, TorchDynamoPlugin, gather_object, set_seed

from trainer import checkpoint, data, optim
from trainer.checkpoint import Checkpointer, TrainState
from trainer.config import Config, TrainConfig, UserError
from trainer.model import apply_sync_bn, build_model, has_batchnorm, mark_fsdp_blocks, size_kwargs
from trainer.report import Predictions
from trainer.resume import checkpoint_dirs
from trainer.tracking import Reporter

WORKING_CPU_LAUNCH = (
    "accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m trainer train ..., "
    "or torchrun --nproc_per_node N -m trainer train ..."
)
MULTI_NODE_HINT = (
    "check that every machine started, reaches the main address and port, and has its own machine rank (or that the "
    "launch uses --rdzv_backend c10d), and name the network interface in NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME; "
    "see README, Scale out"
)


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float


def build_accelerator(cfg: Config, resume_dir: Path | None = None) -> Accelerator:
    """One Accelerator; the launcher decides processes and precision, --mixed-precision may override it.

    `resume_dir`: the run this process is about to continue (None: a new run); every process must agree on it."""
    group: dict = {"backend": cfg.run.dist_backend} if cfg.run.dist_backend else {}
    if cfg.run.dist_timeout:
        # accelerate passes on only values that differ from its own defaults, one of which is 10 minutes (NCCL's):
        # exactly 10 would leave gloo at PyTorch's 30. One second more keeps it.
        seconds = cfg.run.dist_timeout * 60
        group["timeout"] = timedelta(seconds=seconds + (seconds == 600))
    handlers = [InitProcessGroupKwargs(**group)] if group else []
    # prepare() compiles the model after wrapping it; without --compile a launcher's dynamo config still applies.
    dynamo = TorchDynamoPlugin(backend="inductor", mode=cfg.train.compile_mode) if cfg.train.compile else None
    try:
        accelerator = Accelerator(
            # Without a GPU, cpu=True makes torchrun/launch ranks join one gloo group instead of each
            # becoming its own world-1 run.
            cpu=not torch.cuda.is_available(),
            mixed_precision=cfg.train.mixed_precision or None,
            gradient_accumulation_steps=cfg.train.grad_accum,
            # A seeded sampler reshuffles per epoch (set_epoch) identically on every rank. Without data_seed it
            # seeds from torch.initial_seed(), which set_seed(device_specific=True) makes differ between ranks.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed),
            # The schedule counts optimizer updates; we step it once per update, not once per process.
            step_scheduler_with_optimizer=False,
            kwargs_handlers=handlers,
            dynamo_plugin=dynamo,
        )
    except ValueError as e:  # e.g. fp16 requested where it cannot run
        raise UserError(f"cannot set up Accelerate: {e}".split("\n")[0]) from e
    except torch.distributed.DistError as e:  # the peers never all arrived within the timeout
        raise UserError(
            f"the {os.environ.get('WORLD_SIZE', '?')} processes did not form one group ({str(e).splitlines()[0]}); "
            f"{MULTI_NODE_HINT}"
        ) from e
    check_launch(accelerator, resume_dir)
    return accelerator


def check_launch(accelerator: Accelerator, resume_dir: Path | None = None) -> None:
    """Refuse launches that asked for N processes but got fewer, instead of silently training alone, and launches
    whose processes disagree on who they are or on the run they continue."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world != accelerator.num_processes:
        raise UserError(
            f"the launcher started {env_world} processes but Accelerate formed a group of "
            f"{accelerator.num_processes}; launch with {WORKING_CPU_LAUNCH}"
        )
    # accelerate's single-process launcher (--cpu, or distributed_type MULTI_CPU without mpirun) sets
    # MASTER_ADDR only when more than one process was requested, then starts just one.
    if (
        accelerator.num_processes == 1
        and "WORLD_SIZE" not in os.environ
        and "ACCELERATE_USE_CPU" in os.environ
        and "MASTER_ADDR" in os.environ
    ):
        raise UserError(
            "accelerate launch was asked for several processes but started only one (its --cpu and MULTI_CPU "
            f"launchers do that without mpirun); launch with {WORKING_CPU_LAUNCH}"
        )
    # Accelerate takes the FSDP path only for GPU launches: elsewhere an FSDP launch config trains plain DDP silently.
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not fsdp:
        got = str(accelerator.distributed_type).removeprefix("DistributedType.")
        raise UserError(
            f"the launch asked for FSDP but Accelerate set up {got} on {accelerator.device.type} (it shards only on "
            "GPUs); launch it on GPUs, or use a DDP config (accelerate_configs/cpu_2proc.yaml on CPUs)"
        )
    if fsdp and not accelerator.is_fsdp2:
        raise UserError(
            "the launch config asks for FSDP version 1; trainer uses FSDP2: set fsdp_version: 2 "
            "(see accelerate_configs/fsdp.yaml)"
        )

    if accelerator.num_processes > 1:
        found = checkpoint_dirs(resume_dir) if resume_dir is not None else []
        newest = found[-1].name if found else ""
        seen = {
            "rank": accelerator.process_index,
            "host": socket.gethostname(),
            "machine": os.environ.get("GROUP_RANK", ""),  # the node rank torchrun gave this process's launcher
            "run": f"{resume_dir}/{newest}" if resume_dir is not None else "",
        }
        # Collective: every rank sends what it sees, all receive the same list and decide alike.
        problem = launch_problem(gather_object([seen]))
        if problem:
            raise UserError(problem)


def check_fsdp_options(cfg: Config) -> None:
    """Refuse what a sharded model cannot do, before anything is loaded or written."""
    if cfg.model.sync_bn:
        raise UserError(
            "--sync-bn does not work with FSDP (PyTorch does not shard SyncBatchNorm; ViTs have no BatchNorm); "
            "drop --sync-bn, or train with DDP (accelerate_configs/multi_gpu_ddp.yaml)"
        )


def launch_problem(seen: list[dict]) -> str:
    """What is wrong with a formed group, from each process's view of itself (see check_launch); '' if nothing."""
    ranks = sorted(s["rank"] for s in seen)
    if ranks != list(range(len(seen))):
        return f"the processes claim ranks {ranks} instead of 0..{len(seen) - 1}; {MULTI_NODE_HINT}"
    hosts_of: dict[str, set[str]] = {}
    for s in seen:
        if s["machine"]:
            hosts_of.setdefault(s["machine"], set()).add(s["host"])
    for machine, hosts in sorted(hosts_of.items()):
        if len(hosts) > 1:
            return (
                f"machines {', '.join(sorted(hosts))} all claim machine rank {machine}; give each its own "
                "--machine_rank ($SLURM_NODEID expanded on each node, not once by the batch script), or launch with "
                "--rdzv_backend c10d"
            )
    runs = {s["run"] for s in seen}
    if len(runs) > 1:
        views = "; ".join(
            f"rank {s['rank']} on {s['host']}: {s['run'] or 'a new run'}" for s in sorted(seen, key=lambda s: s["rank"])
        )
        return (
            f"the processes see different checkpoints ({views}); the run folder must be on a filesystem every "
            "machine shares, and nothing else may write to it while the job starts"
        )
    return ""


def train(cfg: Config, resume_dir: Path | None = None) -> dict:
    """Run one training job from a validated Config, or continue the run in `resume_dir`. Returns the summary."""
    start = time.time()
    accelerator = build_accelerator(cfg, resume_dir)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp:
        check_fsdp_options(cfg)
    reporter = Reporter(accelerator)
    set_seed(cfg.train.seed, device_specific=True, deterministic=cfg.train.deterministic)
    world = accelerator.num_processes
    if accelerator.device.type == "cpu" and accelerator.mixed_precision != "no":
        capability = torch.backends.cpu.get_cpu_capability()
        if "AMX" not in capability and "AVX512" not in capability:
            # Measured on an AVX2 CPU: bf16 autocast 60x slower than fp32, fp16 6x slower.
            reporter.print_once(
                f"warning: {accelerator.mixed_precision} on this CPU ({capability}) is emulated and much slower "
                "than fp32; use --mixed-precision no here"
            )
    per_device_batch_size = cfg.train.per_device_batch_size(world)
    # A misspelt --model or a size it cannot take fails before minutes of data preparation (classes and channels
    # do not change whether a size fits).
    size_kwargs(cfg.model.model, num_classes=2, in_chans=cfg.model.in_chans or 3, imgsz=cfg.data.imgsz)
    backend = data.choose_backend(cfg.data, accelerator.device.type)  # --loader dali without DALI: refused up front
    if backend.note:
        reporter.print_once(backend.note)

    dataset = data.load_data(accelerator, cfg.data)  # Collective: every rank
    info = dataset.info
    if info.skipped:
        reporter.print(data.unreadable_warning(info))
    if info.train_size < per_device_batch_size * world:
        raise UserError(
            f"--batch-size {cfg.train.batch_size} needs at least {per_device_batch_size * world} training images per "
            f"step but the data has {info.train_size}; lower --batch-size"
        )

    in_chans = cfg.model.in_chans or info.channels
    model = build_model(cfg.model, num_classes=len(info.class_names), in_chans=in_chans, imgsz=cfg.data.imgsz)
    # SyncBN before the optimizer and prepare(), so both see the final layer types.
    model, sync_bn = apply_sync_bn(model, cfg.model.sync_bn, world, accelerator.device.type)
    if cfg.model.sync_bn and not sync_bn.applied:
        reporter.print_once(f"--sync-bn skipped: {sync_bn.reason}; training with plain BatchNorm")
    if fsdp and not mark_fsdp_blocks(model):
        reporter.print_once(
            f"FSDP: {cfg.model.model} has no blocks to shard one by one; it is one unit, gathered whole"
        )
    pre = data.resolve_preprocess(cfg.data, model, in_chans)
    # Loaders first, already sharded: the schedule's length comes from this rank's shard of the data.
    spec = data.loader_spec(cfg.data, backend, pre, seed=cfg.train.seed)
    train_loader, val_loader = data.build_loaders(accelerator, dataset, cfg.data, spec, per_device_batch_size)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum)
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

    if resume_dir is None:
        run_dir = checkpoint.create_run_dir(accelerator, cfg.run.project, cfg.run.name, cfg.run.exist_ok)
    else:
        run_dir = resume_dir
    checkpointer = Checkpointer(
        accelerator,
        run_dir,
        cfg.checkpoint,
        rank_local={"ema": ema.module} if ema is not None else None,
        sharded={"ema": ema.module} if ema is not None and fsdp else None,
    )
    # After everything stateful is prepared or registered for checkpointing: load_state restores exactly those.
    state = checkpointer.restore(cfg.train.epochs) if resume_dir else TrainState()
    record = run_record(
        cfg, accelerator, model, optimizer, train_loader, info, pre, per_device_batch_size, steps_per_epoch, sync_bn
    )
    record["launch"] |= {"loader": backend.name, "loader_reason": backend.reason}
    reporter.start(run_dir, record, cfg.run, resume=resume_dir is not None)
    reporter.print(
        f"{cfg.model.model} on {info.source} ({info.train_size} train / {info.val_size} val, "
        f"{len(info.class_names)} classes), {world} process(es) on {accelerator.device.type}, "
        f"global batch {cfg.train.batch_size} = {per_device_batch_size} x {world} x {cfg.train.grad_accum}, "
        f"precision {accelerator.mixed_precision}"
    )
    reporter.print(data.describe_augmentation(cfg.data, info))
    if resume_dir:
        reporter.keep_results(state.epoch)  # rows written after the checkpoint are trained again
        reporter.print(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step}")
    meta = checkpoint.weights_metadata(cfg.model.model, info.class_names, pre)
    with checkpointer:  # SIGTERM/SIGINT from here on: finish the step, save, exit
        best = fit(
            accelerator,
            model,
            optimizer,
            scheduler,
            train_loader,
            val_loader,
            cfg.train,
            num_classes=len(info.class_names),
            reporter=reporter,
            run_dir=run_dir,
            metadata=meta,
            state=state,
            checkpointer=checkpointer,
            ema=ema,
        )
    # Collective: tear the process group down together; a rank that leaves while rank 0 still writes files
    # was seen to abort in gloo at exit ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    summary = {"best/val_top1": best[0], "best/epoch": best[1], "time_s": time.time() - start, "run_dir": str(run_dir)}
    if state.skipped_steps:
        summary["train/skipped_steps"] = state.skipped_steps
    reporter.finish(summary, val_split=dataset.val)
    return summary


def run_record(
    cfg: Config,
    accelerator,
    model,
    optimizer,
    train_loader,
    info,
    pre,
    per_device_batch_size: int,
    steps_per_epoch: int,
    sync_bn,
) -> dict:
    """The resolved config plus the facts of this launch and dataset, as written to config.yaml and trackers."""
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
        "sync_bn_layers": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),  # after prepare
        "per_device_batch_size": per_device_batch_size,
        "steps_per_epoch": steps_per_epoch,
        "workers": train_loader.num_workers,
        "dynamo_backend": str(accelerator.state.dynamo_plugin.backend.value).lower(),
        "fused_optimizer": any(g.get("fused") for g in optimizer.param_groups),
        # The classes FSDP wrapped, as prepare() resolved them (ours, or the launch config's own list).
        "fsdp_blocks": list(accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap or [])
        if accelerator.distributed_type == DistributedType.FSDP
        else [],
        "versions": _versions(),
    }
    record["dataset"] = data.dataset_record(cfg.data, info, pre)
    return record


def fit(
    accelerator,
    model,
    optimizer,
    scheduler,
    train_loader,
    val_loader,
    cfg: TrainConfig,
    *,
    num_classes: int,
    reporter: Reporter,
    run_dir,
    metadata: dict,
    state: TrainState,
    checkpointer: Checkpointer,
    ema=None,
) -> tuple[float, int]:
    """Train from `state` to cfg.epochs; evaluate, save weights and a checkpoint after each epoch.

    With `ema`, the average is evaluated too and best.safetensors takes whichever of the two scores higher.
    Returns (best top-1, its epoch)."""
    average_bn = accelerator.num_processes > 1 and has_batchnorm(model)
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        train_loader.set_epoch(epoch)
        reporter.epoch_start(epoch, cfg.epochs, len(train_loader) - state.batches_in_epoch)
        stats = train_one_epoch(
            accelerator, model, optimizer, scheduler, train_loader, cfg, state, reporter, checkpointer, ema=ema
        )
        if average_bn:
            sync_bn_stats(accelerator, model)
            if ema is not None:  # each rank averaged its own running statistics into its EMA
                sync_bn_stats(accelerator, ema.module)
        metrics, preds = evaluate(accelerator, model, val_loader, num_classes)
        if ema is not None:
            ema_metrics, ema_preds = evaluate(accelerator, ema.module, val_loader, num_classes)
            metrics |= {f"{k}_ema": v for k, v in ema_metrics.items()}
        scheduler.end_epoch(epoch, metrics["val/top1"])
        metrics = {"train/loss": stats.loss, **metrics, "lr": scheduler.get_last_lr()[0]}
        source = "ema" if ema is not None and metrics["val/top1_ema"] > metrics["val/top1"] else "model"
        top1 = metrics["val/top1_ema" if source == "ema" else "val/top1"]
        is_best = top1 > state.best_top1
        if is_best:
            state.best_top1, state.best_epoch = top1, epoch
        reporter.log({**metrics, "epoch": epoch}, step=state.step)
        best_preds = ema_preds if source == "ema" else preds
        reporter.epoch_end(epoch, cfg.epochs, metrics, stats.seconds, stats.images / stats.seconds, is_best, best_preds)
        meta = {**metadata, "epoch": str(epoch), "val_top1": f"{metrics['val/top1']:.6f}", "weights": "model"}
        best_meta = {**meta, "val_top1": f"{top1:.6f}", "weights": source}
        best_model = ema.module if source == "ema" else model
        checkpoint.save_epoch_weights(accelerator, model, run_dir / "weights", meta, is_best, best_model, best_meta)
        state.epoch, state.batches_in_epoch, state.loss_sum, state.seen = epoch, 0, 0.0, 0.0
        # Collective: every rank saves its part; then all stop together if any of them got a signal.
        checkpointer.end_epoch(state, final=epoch == cfg.epochs)
    return state.best_top1, state.best_epoch


def train_one_epoch(
    accelerator,
    model,
    optimizer,
    scheduler,
    loader,
    cfg: TrainConfig,
    state: TrainState,
    reporter: Reporter,
    checkpointer: Checkpointer,
    ema=None,
) -> EpochStats:
    """One pass over this rank's shard (its rest, when resumed mid-epoch), advancing `state`.

    Returns the epoch's mean loss over all ranks."""
    model.train()
    start = time.time()
    # Resumed mid-epoch: this rank's partial sums come from the checkpoint and its first batches are skipped.
    loss_sum = torch.tensor(state.loss_sum, device=accelerator.device)
    seen = torch.tensor(state.seen, device=accelerator.device)
    trained = torch.zeros((), device=accelerator.device)  # images this session, for img/s
    if state.batches_in_epoch:
        loader = loader.skip(accelerator, state.batches_in_epoch)
    nonfinite = torch.zeros((), device=accelerator.device)
    stop = False
    for batch in loader:
        images, labels = batch.images, batch.labels
        with accelerator.accumulate(model):
            logits = model(images)
            # labels are class indices, or class probabilities when --mixup/--cutmix mixed the batch
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            accelerator.backward(loss)
            finite = torch.isfinite(loss.detach())
            nonfinite += ~finite
            if accelerator.sync_gradients:
                # Collective: all ranks agree whether to skip this update and whether to stop after it.
                skip, stop = checkpointer.check_step(nonfinite, state.step + 1, cfg.skip_nonfinite)
                if skip:
                    state.skipped_steps += 1
                    reporter.print(f"step {state.step + 1}: non-finite loss, update skipped ({state.skipped_steps})")
                else:
                    if cfg.clip_grad > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                nonfinite.zero_()
        loss_sum += torch.where(finite, loss.detach(), 0.0) * labels.shape[0]
        seen += finite * labels.shape[0]
        trained += labels.shape[0]
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
    # Collective: every rank contributes its sums.
    loss_sum, seen, trained = accelerator.reduce(torch.stack([loss_sum, seen, trained]), reduction="sum")
    return EpochStats(loss=(loss_sum / seen).item(), images=int(trained.item()), seconds=time.time() - start)


@torch.no_grad()
def evaluate(accelerator, model, loader, num_classes: int) -> tuple[dict[str, float], Predictions]:
    """Loss, top-1 and top-5 over the whole validation set, and every sample's predictions in dataset order.

    Every rank gets the same full result: each sample counted once across ranks.
    """
    model.eval()
    k = min(5, num_classes)
    parts: list[tuple[torch.Tensor, ...]] = []
    for batch in loader:
        images, labels = batch.images, batch.labels
        with accelerator.autocast():  # the EMA copy is not prepared, so it has no autocast of its own
            logits = model(images).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        probs, topk = logits.softmax(dim=1).topk(k, dim=1)
        # Collective: gather_for_metrics drops the samples padded onto the last batch of the shards; the
        # unshuffled loader hands ranks consecutive batches, so the gathered rows come in dataset order.
        parts.append(accelerator.gather_for_metrics((labels, topk, loss, probs)))
    labels, topk, loss, probs = (torch.cat(column).cpu().numpy() for column in zip(*parts, strict=True))
    preds = Predictions(
        labels=labels.astype(np.int64), topk=topk.astype(np.int64), loss=loss.astype(np.float32), probs=probs
    )
    correct = preds.topk == preds.labels[:, None]
    metrics = {
        "val/loss": float(preds.loss.astype(np.float64).mean()),
        "val/top1": float(correct[:, 0].mean()),
        "val/top5": float(correct.any(axis=1).mean()),
    }
    return metrics, preds


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
