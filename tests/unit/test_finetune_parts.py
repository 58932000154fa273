"""Fine-tuning (--freeze) and early stopping (--patience) pieces, on tiny timm models in one process."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch

from trainer.config import OptimConfig, TrainConfig, UserError
from trainer.run.checkpointer import TrainState
from trainer.train import finetune, stopping
from trainer.train.optim import build_optimizer


def _resnet() -> torch.nn.Module:
    return timm.create_model("test_resnet", num_classes=3, in_chans=1)


def test_freeze_backbone_names_everything_but_the_classifier():
    model = _resnet()
    freeze = finetune.plan_freeze(TrainConfig(freeze="backbone"), model, fsdp=False)
    assert freeze.names == {n for n, _ in model.named_parameters() if not n.startswith("fc.")}
    assert freeze.frozen_at(5) and not finetune.Freeze(freeze.names, unfreeze_epoch=3).frozen_at(3)
    stages = finetune.plan_freeze(TrainConfig(freeze="2"), model, fsdp=False)
    assert {n.split(".")[0] for n in stages.names} == {"conv1", "bn1", "layer1"}  # the stem, then stage 1


def test_freeze_refusals():
    with pytest.raises(UserError, match="no separate classifier"):
        finetune.plan_freeze(TrainConfig(freeze="backbone"), torch.nn.Sequential(torch.nn.Linear(2, 2)), fsdp=False)
    with pytest.raises(UserError, match="not supported under FSDP"):
        finetune.plan_freeze(TrainConfig(freeze="backbone"), _resnet(), fsdp=True)
    assert finetune.plan_freeze(TrainConfig(), _resnet(), fsdp=False) is None


def test_frozen_parameters_get_no_update_decay_or_moments_until_unfrozen():
    """The design finetune's docstring relies on: in the optimizer from the start, skipped while frozen (AdamW with
    weight decay), then updated from zero moments and step 1 after the unfreeze epoch."""
    torch.manual_seed(0)
    model = _resnet()
    optimizer = build_optimizer(OptimConfig(optimizer="adamw", weight_decay=0.5, fused=False), model)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    freeze = finetune.Freeze(frozenset(n for n, _ in model.named_parameters() if not n.startswith("fc.")), 2)
    conv = model.conv1[0].weight
    before = conv.detach().clone()
    images = torch.randn(4, 1, 16, 16)
    for epoch in (1, 2):
        finetune.set_epoch(model, freeze, epoch)
        model.train()
        finetune.hold_frozen_bn(model)
        assert model.bn1.training == (epoch == 2)
        stats = model.bn1.running_mean.clone()
        model(images).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if epoch == 1:
            assert torch.equal(conv, before) and conv not in optimizer.state
            assert torch.equal(model.bn1.running_mean, stats)  # BatchNorm statistics fixed while frozen
            assert optimizer.state[model.fc.weight]["step"] == 1
    assert not torch.equal(conv, before)
    assert optimizer.state[conv]["step"] == 1 and optimizer.state[model.fc.weight]["step"] == 2


def test_patience_counts_on_across_a_resume():
    state = TrainState()
    assert not stopping.count_epoch(state, 1, is_best=True, patience=2)
    assert not stopping.count_epoch(state, 2, is_best=False, patience=2)
    resumed = TrainState(**json.loads(json.dumps(vars(state))))  # as the Checkpointer writes and reads it
    assert stopping.count_epoch(resumed, 3, is_best=False, patience=2)
    assert resumed.stopped_epoch == 3 and stopping.already_stopped(resumed)
    assert "stopped early at epoch 3" in stopping.reason(resumed, 2)
    assert not stopping.count_epoch(TrainState(), 1, is_best=False, patience=None)


def test_patience_never_stops_a_run_before_its_unfreeze_epoch():
    """--patience 1 --unfreeze-epoch 3 and no improvement after epoch 1: epoch 2 used to end the run with the
    backbone never trained; now the count starts over at 3 and the stop comes after the first unfrozen epoch."""
    state = TrainState()
    assert not stopping.count_epoch(state, 1, is_best=True, patience=1, unfreeze_epoch=3)
    assert not stopping.count_epoch(state, 2, is_best=False, patience=1, unfreeze_epoch=3)
    assert stopping.count_epoch(state, 3, is_best=False, patience=1, unfreeze_epoch=3) and state.stopped_epoch == 3
    improving = TrainState()
    for epoch in (1, 2):
        stopping.count_epoch(improving, epoch, is_best=epoch == 1, patience=2, unfreeze_epoch=3)
    assert not stopping.count_epoch(improving, 3, is_best=True, patience=2, unfreeze_epoch=3)
    assert not stopping.count_epoch(improving, 4, is_best=False, patience=2, unfreeze_epoch=3)
    assert stopping.count_epoch(improving, 5, is_best=False, patience=2, unfreeze_epoch=3)


def test_lr_find_suggests_the_steepest_descent_of_the_smoothed_loss():
    from trainer.train.lr_find import smooth, suggest

    lrs = list(np.geomspace(1e-6, 1, 300))
    # a loss falling fastest per decade at 1e-3, then rising (divergence)
    losses = [2 - math.tanh(math.log10(lr) + 3) + (5 * (lr - 0.1) if lr > 0.1 else 0) for lr in lrs]
    assert smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # bias-corrected: no pull towards 0
    suggested = suggest(lrs, smooth(losses))
    assert 1e-4 < suggested < 1e-2


def test_auto_batch_finds_the_largest_size_under_a_simulated_memory_limit():
    """A probe that runs out of memory above 300 images: 296 fit, 264 (90 %, a multiple of 8) is used."""
    from trainer.train.autobatch import largest_batch, with_margin

    tried = []

    def probe(size: int) -> None:
        tried.append(size)
        if size > 300:
            raise torch.OutOfMemoryError("simulated")

    assert largest_batch(probe) == 296 and with_margin(296) == 264
    assert all(size % 8 == 0 for size in tried) and len(tried) <= 12  # 7 doublings, 5 bisections
    assert largest_batch(lambda size: (_ for _ in ()).throw(torch.OutOfMemoryError("none"))) == 0


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_auto_batch_resolves_the_global_batch_or_keeps_the_default_on_cpu():
    from accelerate import Accelerator

    from trainer.config import BATCH_AUTO, DEFAULT_BATCH_SIZE
    from trainer.train.autobatch import resolve

    accelerator = Accelerator(cpu=True)
    cfg = TrainConfig(batch_size=BATCH_AUTO, grad_accum=2)

    def probe(size: int) -> None:
        if size > 100:
            raise torch.OutOfMemoryError("simulated")

    resolved, line = resolve(cfg, accelerator, probe, gpu=True)  # the GPU path, memory simulated
    # 96 fit (101 would not: bisection over multiples of 8); 90 % of it, down to a multiple of 8: 80
    assert resolved.batch_size == 80 * 2 and not resolved.auto_batch
    assert "96 images fit per device" in line and "global batch 160 = 80 x 1 x 2" in line
    on_cpu, line = resolve(cfg, accelerator, probe)
    assert on_cpu.batch_size == DEFAULT_BATCH_SIZE and "no GPU to probe on cpu" in line
    assert resolve(TrainConfig(), accelerator, probe) == (TrainConfig(), "")
