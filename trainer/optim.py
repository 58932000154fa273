"""Optimizer (timm's factory) and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig, UserError


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on norm and bias parameters."""
    from timm.optim import create_optimizer_v2, list_optimizers

    names = list_optimizers()
    if cfg.optimizer.lower() not in names:
        raise UserError(f"--optimizer {cfg.optimizer!r} is unknown; choose from {', '.join(sorted(names))}")
    return create_optimizer_v2(
        model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """Multiplier of the peak lr at optimizer step `step`: linear warmup, then cosine down to `min_factor`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Schedule counted in optimizer steps (not micro-batches): step it once per optimizer update."""
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    total_steps = steps_per_epoch * epochs
    min_factor = cfg.min_lr / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_factor)
    )
