"""`trainer lr-find`: an exponential learning-rate sweep (fastai's lr_find, Lightning's Tuner.lr_find), advisory.

Takes train's flags and builds what a training step is made of through train's own code (trainer.train.engine's
`build_step`: the model with its initial weights, the task's loss and class weights, a teacher's term, what --freeze
holds), then trains a throwaway copy for `steps` updates while the lr rises geometrically from `start_lr` to `end_lr`.
Nothing is saved but the sweep (lr_find.csv, lr_find.png); no run folder of train is touched. The suggestion is the
lr where the smoothed loss falls fastest (steepest negative slope over log lr), a starting point for --lr, not a
promise. Runs under accelerate launch / torchrun: each step's loss is the mean over ranks.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from trainer import data
from trainer.config import Config, RunConfig, UserError
from trainer.report.evaluation import pyplot
from trainer.run.rundirs import RunFolder, create_run_dir
from trainer.run.writes import atomic_file
from trainer.train import finetune, optim
from trainer.train.engine import Step, build_step, load_data, prepare_launch
from trainer.train.tasks import describe_task

LR_FIND_PROJECT = "runs/lr_find"
SMOOTHING = 0.98  # of the loss's exponential moving average (fastai's)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its lowest value


def lr_find(cfg: Config, steps: int = 200, start_lr: float = 1e-7, end_lr: float = 10.0) -> dict:
    """Sweep, write lr_find.csv and lr_find.png, print and return the advisory suggestion. Every rank calls this."""
    if not 0 < start_lr < end_lr:
        raise UserError(f"--start-lr {start_lr} must be positive and below --end-lr {end_lr}")
    accelerator, reporter = prepare_launch(cfg, None)
    backend, dataset = load_data(accelerator, cfg, reporter)
    # train's own step: the task's loss and class weights, the teacher's term, what --freeze holds
    cfg, step = build_step(accelerator, cfg, dataset, reporter)
    if step.freeze is not None and step.freeze.unfreeze_epoch:
        reporter.print_once(f"--unfreeze-epoch {step.freeze.unfreeze_epoch}: the sweep is of epoch 1, still frozen")
    if step.teacher is not None:
        reporter.print_once(step.teacher.describe())
    reporter.print_once(describe_task(step.task, cfg.train.class_weights, cfg.data.balanced_sampler))
    spec = data.loader_spec(cfg.data, backend, step.pre, seed=cfg.train.seed)
    batch = cfg.train.batch_size // accelerator.num_processes  # one forward per update: no accumulation here
    train_loader, _ = data.build_loaders(accelerator, dataset, cfg.data, spec, max(1, batch))
    optimizer = optim.build_optimizer(cfg.optim, step.model)
    model, optimizer = accelerator.prepare(step.model, optimizer)
    finetune.set_epoch(accelerator.unwrap_model(model), step.freeze, 1)  # after prepare, as train's loop does
    lrs, losses = _sweep(accelerator, model, optimizer, train_loader, step, np.geomspace(start_lr, end_lr, steps))
    smoothed = smooth(losses)
    suggested = suggest(lrs, smoothed)
    folder = RunFolder(
        LR_FIND_PROJECT if cfg.run.project == RunConfig.project else cfg.run.project, cfg.run.name, cfg.run.exist_ok
    )
    run_dir = create_run_dir(accelerator, folder, weights_dir=False)  # Collective: the main process names it
    if accelerator.is_main_process:
        write_sweep(run_dir, lrs, losses, smoothed, suggested)
    reporter.print(
        f"lr-find: {len(lrs)} steps from {lrs[0]:.2e} to {lrs[-1]:.2e} on {accelerator.num_processes} process(es); "
        f"suggested lr {suggested:.2e} (steepest descent of the smoothed loss; advisory: check the plot). "
        f"Results saved to {run_dir}"
    )
    # Collective: leave together, after the main process has written the files.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"suggested_lr": suggested, "steps": len(lrs), "run_dir": str(run_dir)}


def _sweep(accelerator, model, optimizer, loader, step: Step, schedule: np.ndarray) -> tuple[list, list]:
    """One optimizer update per lr of `schedule` (epochs of the loader repeated as needed); stops on divergence.
    The loss is train's: `step.task`'s, with `step.teacher`'s term mixed in."""
    model.train()
    finetune.hold_frozen_bn(model)
    lrs: list[float] = []
    losses: list[float] = []
    scales = [group.get("lr_scale", 1.0) for group in optimizer.param_groups]  # --layer-decay's ratios
    epoch = 0
    while len(lrs) < len(schedule):
        epoch += 1
        loader.set_epoch(epoch)
        for batch in loader:
            lr = float(schedule[len(lrs)])
            for group, scale in zip(optimizer.param_groups, scales, strict=True):
                group["lr"] = lr * scale
            logits = model(batch.images)
            loss = step.task.loss(logits, batch.labels)
            if step.teacher is not None:
                loss = step.teacher.mix(loss, logits, batch.images)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Collective: every rank, every step; the mean over ranks makes every rank take the same stop decision.
            mean = accelerator.reduce(loss.detach(), reduction="mean").item()
            lrs.append(lr)
            losses.append(mean)
            best = min(smooth(losses))
            if not math.isfinite(mean) or smooth(losses)[-1] > DIVERGED * best or len(lrs) == len(schedule):
                return lrs, losses
    return lrs, losses


def smooth(losses: list[float]) -> list[float]:
    """Exponential moving average of the losses, bias-corrected (as fastai's recorder)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append(average / (1 - SMOOTHING**i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The lr where the smoothed loss falls fastest per decade (min of d loss / d log lr), ignoring the last tenth
    (where the loss diverges); the first lr when too few points were recorded."""
    finite = [i for i, v in enumerate(smoothed) if math.isfinite(v)]
    if len(finite) < 3:
        return lrs[0]
    end = max(3, int(len(finite) * 0.9))
    kept = finite[:end]
    slope = np.gradient(np.array([smoothed[i] for i in kept]), np.log10([lrs[i] for i in kept]))
    return float(lrs[kept[int(np.argmin(slope))]])


def write_sweep(run_dir: Path, lrs: list, losses: list, smoothed: list, suggested: float) -> None:
    """Main process only: lr_find.csv (step, lr, loss, smoothed_loss) and lr_find.png (log-lr axis, the suggestion)."""
    with atomic_file(run_dir / "lr_find.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "lr", "loss", "smoothed_loss"])
        for step, row in enumerate(zip(lrs, losses, smoothed, strict=True), start=1):
            writer.writerow([step, *(f"{v:.6g}" for v in row)])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, label="smoothed loss")
    ax.axvline(suggested, color="red", linestyle="--", label=f"suggested {suggested:.1e} (advisory)")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="lr-find")
    ax.legend()
    fig.tight_layout()
    with atomic_file(run_dir / "lr_find.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
