"""Launch checks: one Accelerator as the launcher asked for it, and the launches refused before anything is loaded
or written (too few processes, disagreeing ranks or machines, FSDP where it cannot shard, emulated precision)."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import DistributedType, TorchDynamoPlugin, gather_object

from trainer.config import Config, UserError
from trainer.run.layout import checkpoint_dirs

WORKING_CPU_LAUNCH = (
    "accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m trainer train ..., "
    "or torchrun --nproc_per_node N -m trainer train ..."
)
MULTI_NODE_HINT = (
    "check that every machine started, reaches the main address and port, and has its own machine rank (or that the "
    "launch uses --rdzv_backend c10d), and name the network interface in NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME; "
    "see docs/distributed.md, Several machines"
)


def build_accelerator(cfg: Config, resume_dir: Path | None = None) -> Accelerator:
    """One Accelerator; the launcher decides processes and precision, --mixed-precision may override it.

    `resume_dir`: the run this process is about to continue (None: a new run); every process must agree on it."""
    group: dict = {}
    if cfg.run.dist_backend and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A backend handed to accelerate makes it set up a process group; a plain single process has none to join.
        group["backend"] = cfg.run.dist_backend
    if cfg.run.dist_timeout:
        # accelerate passes on only values that differ from its own defaults, one of which is 10 minutes (NCCL's):
        # exactly 10 would leave gloo at PyTorch's 30. One second more keeps it.
        seconds = cfg.run.dist_timeout * 60
        group["timeout"] = timedelta(seconds=seconds + (seconds == 600))
    handlers = [InitProcessGroupKwargs(**group)] if group else []
    if cfg.train.freeze:  # frozen parameters get no gradient until --unfreeze-epoch (trainer.train.finetune)
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    # prepare() compiles the model after wrapping it; without --compile a launcher's dynamo config still applies.
    # --progressive: static shapes, one graph per size (a bounded set, see allow_recompiles) rather than dynamo's
    # switch to one dynamic-shape graph at the second size (its kernels ran 1.3-1.4x slower: docs/training.md).
    dynamic = False if cfg.data.progressive else None
    dynamo = (
        TorchDynamoPlugin(backend="inductor", mode=cfg.train.compile_mode, dynamic=dynamic)
        if cfg.train.compile
        else None
    )
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


def allow_recompiles(sizes: int) -> None:
    """Let torch.compile keep a graph per image size (--progressive): each size in training mode, the evaluation
    size in eval mode and its last, smaller batch, with room to spare; past dynamo's limit (8) it would fall back to
    eager for the rest of the run."""
    import torch._dynamo

    needed = 2 * (sizes + 1)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)


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
    if cfg.distill.teacher:
        raise UserError(
            "--teacher does not work with FSDP (the teacher would be a whole unsharded copy on every rank); "
            "train with DDP (accelerate_configs/multi_gpu_ddp.yaml), or drop --teacher"
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


def emulated_precision_warning(accelerator: Accelerator) -> str:
    """A warning when mixed precision on this CPU would be emulated, much slower than fp32; '' otherwise."""
    if accelerator.device.type != "cpu" or accelerator.mixed_precision == "no":
        return ""
    capability = torch.backends.cpu.get_cpu_capability()
    if "AMX" in capability or "AVX512" in capability:
        return ""
    # Measured on an AVX2 CPU: bf16 autocast 60x slower than fp32, fp16 6x slower.
    return (
        f"warning: {accelerator.mixed_precision} on this CPU ({capability}) is emulated and much slower "
        "than fp32; use --mixed-precision no here"
    )


# The first batch's float32 input times this: the images as decoded and resized, the collated batch, its normalised
# copy on the device, the first layer's output. A floor, not a forecast: a size it refuses cannot run at all.
FIRST_BATCH_COPIES = 4


def check_memory(cfg: Config, accelerator: Accelerator) -> None:
    """Refuse in one line an --imgsz whose first batch cannot fit in this process's share of memory (host, and the
    GPU's free memory on CUDA), before any data is read: the kernel would kill the process without a word."""
    import psutil

    per_device = cfg.train.per_device_batch_size(accelerator.num_processes) if not cfg.train.auto_batch else 8
    channels = cfg.model.in_chans or 3
    needed = per_device * channels * cfg.data.imgsz**2 * 4 * FIRST_BATCH_COPIES
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    budgets = {"memory": psutil.virtual_memory().available // max(local, 1)}
    if accelerator.device.type == "cuda":
        budgets["GPU memory"] = torch.cuda.mem_get_info(accelerator.device)[0]
    for where, available in budgets.items():
        if needed > available:
            raise UserError(
                f"--imgsz {cfg.data.imgsz}: a batch of {per_device} images of {channels} x {cfg.data.imgsz} x "
                f"{cfg.data.imgsz} needs at least {_gib(needed)} and this process has {_gib(available)} of {where}; "
                "lower --imgsz or --batch-size"
            )


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
