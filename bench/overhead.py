"""Loop overhead: trainer's train_one_epoch against a bare PyTorch loop over the SAME pre-made batches.

Both sides train the same model (same initial weights), batch size, precision and optimizer (the same timm
factory, so the same kernel) on identical tensors already in memory, so only the loop differs: Accelerate's
prepared DataLoader/model/optimizer, `accumulate`, the schedule, loss bookkeeping and logging. Rounds alternate
(trainer, bare, bare, trainer, ...) so that machine load hits both alike; the first round of each is warm-up.
Prints optimizer steps per second of both, per round and as medians, and their ratio (goal: >= 0.95).

    python bench/overhead.py                       # resnet10t, 1x32x32, batch 128, fp32: about a minute on 2 cores
    python bench/overhead.py --model resnet18 --imgsz 64 --steps 30 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from trainer.config import build_config
from trainer.data import Batch
from trainer.report.reporter import Reporter
from trainer.run.checkpointer import Checkpointer, TrainState
from trainer.train import optim
from trainer.train.launch import build_accelerator
from trainer.train.loop import Loop, train_one_epoch
from trainer.train.model import build_model


def configured(args) -> tuple:
    """The run config and Accelerator of a loop benchmark: --model, --batch-size, --mixed-precision, --channels-last;
    the torch seed set. Shared with bench/distill_step.py."""
    cfg = build_config(
        {
            "model": {"model": args.model, "channels_last": args.channels_last},
            "train": {"batch_size": args.batch_size, "mixed_precision": args.mixed_precision, "epochs": 1},
            "run": {"tracker": "none"},
        }
    )
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    return cfg, accelerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--imgsz", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per side (after one warm-up round)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    cfg, accelerator = configured(args)
    device = accelerator.device
    num_classes = 10
    batches = [
        Batch(
            torch.randn(args.batch_size, args.in_chans, args.imgsz, args.imgsz, device=device),
            torch.randint(0, num_classes, (args.batch_size,), device=device),
        )
        for _ in range(args.steps)
    ]

    # trainer: its own components, prepared by Accelerate, driven by loop.train_one_epoch.
    model = build_model(cfg.model, num_classes, args.in_chans)
    bare_model = copy.deepcopy(model).to(device)
    optimizer = optim.build_optimizer(cfg.optim, model)
    scheduler = optim.build_scheduler(cfg.optim, optimizer, args.steps, epochs=args.rounds + 1)
    loader = accelerator.prepare(DataLoader(batches, batch_size=None))
    model, optimizer = accelerator.prepare(model, optimizer)
    reporter = Reporter(accelerator)
    state = TrainState()  # the loop's per-step bookkeeping, as in a run; no checkpoint is due in these rounds
    checkpointer = Checkpointer(accelerator, Path(tempfile.mkdtemp()), cfg.checkpoint)
    loop = Loop(accelerator, model, optimizer, scheduler, loader, state, reporter, checkpointer)

    def run_trainer() -> float:
        start = time.perf_counter()
        state.batches_in_epoch, state.loss_sum, state.seen = 0, 0.0, 0.0
        train_one_epoch(loop, cfg.train)
        return time.perf_counter() - start

    # bare PyTorch: the same work written out by hand.
    bare_optimizer = optim.build_optimizer(cfg.optim, bare_model)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    smoothing = cfg.train.label_smoothing

    def run_bare() -> float:
        bare_model.train()
        start = time.perf_counter()
        for batch in batches:
            images, labels = batch.images, batch.labels
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = bare_model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
            loss.backward()
            bare_optimizer.step()
            bare_optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    print(
        f"{args.model}, {args.in_chans}x{args.imgsz}x{args.imgsz}, batch {args.batch_size}, {args.steps} steps/round, "
        f"precision {accelerator.mixed_precision}, {device}, {torch.get_num_threads()} threads, "
        f"optimizer {type(optimizer.optimizer).__name__} fused={bool(optimizer.optimizer.defaults.get('fused'))}",
        flush=True,
    )
    run_trainer(), run_bare()  # warm-up: allocator, kernels, first-call costs
    trainer_rates, bare_rates = [], []
    for r in range(args.rounds):
        order = (run_trainer, run_bare) if r % 2 == 0 else (run_bare, run_trainer)
        for fn in order:
            rate = args.steps / fn()
            (trainer_rates if fn is run_trainer else bare_rates).append(rate)
        print(
            f"round {r + 1}: trainer {trainer_rates[-1]:.3f} steps/s  bare {bare_rates[-1]:.3f} steps/s  "
            f"ratio {trainer_rates[-1] / bare_rates[-1]:.3f}",
            flush=True,
        )
    trainer_rate, bare_rate = statistics.median(trainer_rates), statistics.median(bare_rates)
    print(
        f"median: trainer {trainer_rate:.3f} steps/s  bare PyTorch {bare_rate:.3f} steps/s  "
        f"ratio {trainer_rate / bare_rate:.3f} (goal >= 0.95)"
    )
    accelerator.end_training()


if __name__ == "__main__":
    main()
