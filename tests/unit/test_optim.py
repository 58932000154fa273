"""Optimizer factory, timm schedules counted in optimizer updates, and the weight EMA."""

from __future__ import annotations

import itertools

import pytest
import torch

from trainer.config import OptimConfig, UserError
from trainer.train.optim import build_ema, build_optimizer, build_scheduler


def _run_schedule(cfg: OptimConfig, steps_per_epoch: int, epochs: int, val_top1=None) -> list[float]:
    """lr used by each optimizer update, in order (val_top1: per-epoch metric fed to plateau)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch, epochs)
    lrs = []
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            lrs.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        scheduler.end_epoch(epoch, val_top1[epoch - 1] if val_top1 else 0.5)
    lrs.append(scheduler.get_last_lr()[0])  # what a further update would use
    return lrs


def test_cosine_warmup_in_epochs_rises_linearly_then_decays_to_min_lr():
    cfg = OptimConfig(lr=0.1, min_lr=0.001, warmup_lr=0.0, warmup_epochs=1)
    lrs = _run_schedule(cfg, steps_per_epoch=5, epochs=3)
    assert lrs[:6] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08, 0.1])  # warmup of 5 updates, then the peak
    decay = lrs[5:]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert lrs[-1] == pytest.approx(cfg.min_lr)  # after the last update the schedule has run exactly to its end


def test_warmup_steps_replace_warmup_epochs():
    cfg = OptimConfig(lr=0.1, warmup_lr=0.0, warmup_epochs=3, warmup_steps=2, sched="constant")
    assert _run_schedule(cfg, steps_per_epoch=4, epochs=2)[:4] == pytest.approx([0.0, 0.05, 0.1, 0.1])


def test_step_schedule_decays_every_decay_epochs():
    cfg = OptimConfig(lr=0.1, warmup_epochs=0, sched="step", decay_epochs=1, decay_rate=0.5)
    lrs = _run_schedule(cfg, steps_per_epoch=2, epochs=3)
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])


def test_plateau_decays_after_patience_and_its_state_round_trips(tmp_path):
    cfg = OptimConfig(lr=0.1, warmup_epochs=0, sched="plateau", patience_epochs=1, decay_rate=0.5, min_lr=0.0)
    # Improves, then stalls: the lr halves once patience (1 epoch) is exceeded.
    lrs = _run_schedule(cfg, steps_per_epoch=1, epochs=4, val_top1=[0.5, 0.6, 0.6, 0.6])
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05])

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(cfg, optimizer, 1, 4)
    for epoch, top1 in enumerate([0.5, 0.6, 0.6], start=1):
        scheduler.end_epoch(epoch, top1)
    # Plain values only: loadable with torch.load(weights_only=True).
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    restored = build_scheduler(cfg, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr), 1, 4)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for s in (scheduler, restored):
        s.end_epoch(4, 0.6)
    assert restored.get_last_lr() == scheduler.get_last_lr() == pytest.approx([0.05])


def test_schedule_state_restores_the_lr_of_the_next_update():
    cfg = OptimConfig(lr=0.1, min_lr=0.0, warmup_epochs=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(cfg, optimizer, 4, 3)
    for _ in range(7):
        scheduler.step()
    fresh_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    restored = build_scheduler(cfg, fresh_optimizer, 4, 3)
    restored.load_state_dict(scheduler.state_dict())
    assert restored.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


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


@pytest.mark.parametrize(("name", "fused"), [("adamw", True), ("sgd", True), ("lamb", None), ("lars", None)])
def test_fused_kernel_where_pytorch_has_one(name, fused):
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(OptimConfig(optimizer=name, lr=0.01), model)
    assert optimizer.defaults.get("fused") is fused
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # the fused kernel runs on this device
    assert build_optimizer(OptimConfig(optimizer=name, fused=False), model).defaults.get("fused") in (None, False)


def test_layer_decay_scales_lower_layers_and_reported_lr_is_the_schedule():
    import timm

    model = timm.create_model("test_vit", num_classes=3)
    cfg = OptimConfig(optimizer="adamw", lr=0.01, layer_decay=0.5, warmup_epochs=0, sched="constant")
    optimizer = build_optimizer(cfg, model)
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert scales[-1] == 1.0 and scales[0] < 0.5 * 0.5  # the head at full lr, the stem decayed over the depth
    scheduler = build_scheduler(cfg, optimizer, 2, 1)
    scheduler.step()
    assert {round(g["lr"] / g["lr_scale"], 9) for g in optimizer.param_groups} == {0.01}
    assert scheduler.get_last_lr() == pytest.approx([0.01] * len(optimizer.param_groups))


def test_ema_is_a_copy_that_moves_toward_the_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = build_ema(OptimConfig(ema=True, ema_decay=0.9, ema_warmup=False), model)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model, step=2)
    # decay 0.9: the average moves a tenth of the way to the new weights; the model itself is untouched.
    torch.testing.assert_close(ema.module[0].weight, start + 0.1)
    assert ema.module[0].weight.data_ptr() != model[0].weight.data_ptr()
