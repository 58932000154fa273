"""--batch-size auto: the largest per-device micro-batch that fits in GPU memory, found by a short probe.

The probe runs forward + backward of the run's model on random images at the run's precision (the accelerator's
autocast), image size and memory format (--channels-last), not compiled (compiling every probed size would take
minutes; inductor's peak memory is at or below eager's). Sizes double from 8 until one runs out of memory, then a
bisection over multiples of 8 finds the largest that fits; SAFETY of it, rounded down to a multiple of 8, is used,
leaving room for the optimizer's state, the loader and fragmentation. The minimum over ranks is taken, so every
rank trains the same micro-batch; the global batch (micro-batch x processes x --grad-accum) replaces "auto" in the
config, so config.yaml, the header and --resume see a plain number. On a CPU nothing is probed: the default
batch is used, with one line saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from trainer.config import DEFAULT_BATCH_SIZE, TrainConfig, UserError

MULTIPLE = 8
SAFETY = 0.9  # of the largest size that ran
CEILING = 8192  # per device: the probe stops doubling here


def largest_batch(probe: Callable[[int], None], ceiling: int = CEILING) -> int:
    """The largest multiple of 8 (<= ceiling) for which probe(size) does not raise torch.OutOfMemoryError; 0 if 8
    does not fit."""
    fits, size = 0, MULTIPLE
    while size <= ceiling and _fits(probe, size):
        fits, size = size, size * 2
    if fits == 0:
        return 0
    low, high = fits, min(size, ceiling + MULTIPLE)  # low fits; high did not (or is beyond the ceiling)
    while high - low > MULTIPLE:
        middle = (low + high) // 2 // MULTIPLE * MULTIPLE
        low, high = (middle, high) if _fits(probe, middle) else (low, middle)
    return low


def _fits(probe: Callable[[int], None], size: int) -> bool:
    try:
        probe(size)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def with_margin(size: int) -> int:
    return max(MULTIPLE, int(size * SAFETY) // MULTIPLE * MULTIPLE)


def resolve(cfg: TrainConfig, accelerator, probe: Callable[[int], None], gpu: bool | None = None):
    """(cfg with a real global batch for --batch-size auto, the line to print); (cfg, "") otherwise.

    Every rank calls this (a collective inside on a GPU). `gpu`: probe (default: whether the device is CUDA)."""
    if not cfg.auto_batch:
        return cfg, ""
    world = accelerator.num_processes
    if not (accelerator.device.type == "cuda" if gpu is None else gpu):
        return (
            replace(cfg, batch_size=DEFAULT_BATCH_SIZE),
            f"--batch-size auto: no GPU to probe on {accelerator.device.type}; using the default {DEFAULT_BATCH_SIZE}",
        )
    found = torch.tensor(largest_batch(probe), device=accelerator.device)
    # Collective: every rank probes, then all take the smallest rank's size (a shared or busier GPU fits less).
    found = int(accelerator.gather(found[None]).min().item())
    if found == 0:
        raise UserError("--batch-size auto: not even 8 images fit on a GPU; lower --imgsz or pick a smaller --model")
    per_device = with_margin(found)
    batch = per_device * world * cfg.grad_accum
    line = (
        f"--batch-size auto: {found} images fit per device, using {per_device} ({SAFETY:.0%}, a multiple of "
        f"{MULTIPLE}): global batch {batch} = {per_device} x {world} x {cfg.grad_accum}"
    )
    return replace(cfg, batch_size=batch), line


def resolve_config(cfg, accelerator, model: torch.nn.Module, info) -> tuple:
    """(Config with --batch-size auto resolved, the line to print); the Config itself otherwise. Every rank."""
    if not cfg.train.auto_batch:
        return cfg, ""
    in_chans = cfg.model.in_chans or info.channels
    probe = training_probe(accelerator, model, in_chans, cfg.data.imgsz, len(info.class_names), cfg.model.channels_last)
    train, line = resolve(cfg.train, accelerator, probe)
    return replace(cfg, train=train), line


def training_probe(accelerator, model: torch.nn.Module, in_chans: int, imgsz: int, num_classes: int, channels_last):
    """probe(size): one forward + backward of `model` (moved to the device) on `size` random images. The model's
    buffers (BatchNorm statistics) are put back after each probe and the images come from a generator of their own,
    so the run starts from the same state and random stream as with a fixed batch."""
    model = model.to(accelerator.device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    generator = torch.Generator(accelerator.device).manual_seed(0)

    def probe(size: int) -> None:
        shape = (size, in_chans, imgsz, imgsz)
        images = torch.randn(shape, device=accelerator.device, generator=generator).to(memory_format=memory_format)
        labels = torch.randint(0, num_classes, (size,), device=accelerator.device, generator=generator)
        try:
            with accelerator.autocast():
                loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])

    return probe
