"""Optimizer factory and the warmup + cosine schedule, counted in optimizer steps."""

from __future__ import annotations

import itertools

import pytest
import torch

from trainer.config import OptimConfig, UserError
from trainer.optim import build_optimizer, build_scheduler, lr_factor


def test_lr_factor_warmup_is_linear_up_to_one():
    warmup, total = 4, 20
    assert [lr_factor(s, warmup, total, 0.1) for s in range(warmup)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_lr_factor_cosine_from_one_to_min():
    warmup, total, min_factor = 4, 20, 0.1
    assert lr_factor(warmup, warmup, total, min_factor) == pytest.approx(1.0)
    # Half way through the decay the cosine is at 0: the factor is the mean of 1 and min_factor.
    assert lr_factor(12, warmup, total, min_factor) == pytest.approx(0.55)
    assert lr_factor(total, warmup, total, min_factor) == pytest.approx(min_factor)
    assert lr_factor(total + 5, warmup, total, min_factor) == pytest.approx(min_factor)  # held after the end
    decay = [lr_factor(s, warmup, total, min_factor) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in itertools.pairwise(decay))


def test_lr_factor_without_warmup_starts_at_peak():
    assert lr_factor(0, 0, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 0, 10, 0.0) == pytest.approx(0.0)


def test_scheduler_stepped_per_optimizer_step_ends_at_min_lr():
    cfg = OptimConfig(lr=0.1, min_lr=0.001, warmup_epochs=1)
    steps_per_epoch, epochs = 5, 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, epochs)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(steps_per_epoch * epochs):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert lrs[0] == pytest.approx(cfg.lr / steps_per_epoch)  # first warmup step
    assert max(lrs) == pytest.approx(cfg.lr)
    # Warmup factors are (step + 1) / warmup_steps: the last warmup step is at the peak, and so is the first
    # cosine step (cos 0 = 1).
    assert lrs[steps_per_epoch - 1] == pytest.approx(cfg.lr)
    assert lrs[steps_per_epoch] == pytest.approx(cfg.lr)
    assert lrs[steps_per_epoch + 1] < cfg.lr
    assert lrs[-1] == pytest.approx(cfg.min_lr)


def test_unknown_optimizer_lists_choices():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match=r"--optimizer 'adamww' is unknown; choose from .*\badamw\b.*\bsgd\b"):
        build_optimizer(OptimConfig(optimizer="adamww"), model)


def test_optimizer_name_is_case_insensitive_and_skips_decay_on_norm_and_bias():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = build_optimizer(OptimConfig(optimizer="AdamW", lr=0.01, weight_decay=0.05), model)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(model[0].weight)] == 0.05
    for p in (model[0].bias, model[1].weight, model[1].bias):
        assert decay_of[id(p)] == 0.0
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
