"""Step time of distillation against the single-label step: same student, batch, precision and optimizer, one run.

Three measurements on the SAME pre-made batches already on the device, rounds alternating so that machine load hits
all alike (the first round of each is warm-up):
  single-label   loop.train_one_epoch, cross-entropy only (--teacher off)
  distillation   loop.train_one_epoch with the frozen teacher: its forward + the KL term join every step
  teacher fwd    the teacher's forward alone (Teacher.logits: no_grad, under the run's autocast), what it adds
Prints milliseconds per step (medians over rounds) side by side and the distillation/single-label ratio.

    python bench/distill_step.py                      # resnet10t from resnet18, 1x32x32, batch 128, fp32 (CPU)
    python bench/distill_step.py --model resnet18 --teacher resnet50 --imgsz 224 --in-chans 3 --mixed-precision bf16
    python bench/distill_step.py --cpu-smoke --out /tmp/distill.json   # tiny, to see nothing is broken
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
from overhead import configured
from torch.utils.data import DataLoader

from trainer.data import Batch
from trainer.report.reporter import Reporter
from trainer.run.checkpointer import Checkpointer, TrainState
from trainer.train import optim
from trainer.train.distill import Teacher
from trainer.train.loop import Loop, train_one_epoch
from trainer.train.model import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--imgsz", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per side (after one warm-up round)")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models and batches: checks, not figures")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.model, args.teacher, args.imgsz, args.in_chans, args.batch_size, args.steps, args.rounds = (
            "test_resnet", "test_efficientnet", 16, 1, 8, 2, 1,
        )  # fmt: skip
        args.mixed_precision, args.channels_last = "no", False

    cfg, accelerator = configured(args)  # as bench/overhead.py builds them
    device = accelerator.device
    num_classes = 10
    shape = (args.batch_size, args.in_chans, args.imgsz, args.imgsz)
    batches = [Batch(torch.randn(shape), torch.randint(0, num_classes, (args.batch_size,))) for _ in range(args.steps)]

    model = build_model(cfg.model, num_classes, args.in_chans)
    teacher_model = timm.create_model(args.teacher, num_classes=num_classes, in_chans=args.in_chans)
    if args.channels_last:
        teacher_model = teacher_model.to(memory_format=torch.channels_last)
    teacher_model = teacher_model.to(device).eval().requires_grad_(False)
    teacher = Teacher(teacher_model, alpha=0.5, temperature=2.0, autocast=accelerator.autocast, record={})
    optimizer = optim.build_optimizer(cfg.optim, model)
    scheduler = optim.build_scheduler(cfg.optim, optimizer, args.steps, epochs=3 * (args.rounds + 1))
    loader = accelerator.prepare(DataLoader(batches, batch_size=None))
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()  # no checkpoint is due in these rounds (--checkpoint-every 0)
    checkpointer = Checkpointer(accelerator, Path(tempfile.mkdtemp()), cfg.checkpoint)
    loop = Loop(accelerator, model, optimizer, scheduler, loader, state, Reporter(accelerator), checkpointer)
    resident = [b.to(device) for b in batches]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step_ms(with_teacher: bool) -> float:
        loop.teacher = teacher if with_teacher else None
        state.batches_in_epoch, state.loss_sum, state.seen = 0, 0.0, 0.0
        sync()
        start = time.perf_counter()
        train_one_epoch(loop, cfg.train)
        sync()
        return (time.perf_counter() - start) * 1e3 / args.steps

    def teacher_ms() -> float:
        sync()
        start = time.perf_counter()
        for batch in resident:
            teacher.logits(batch.images)
        sync()
        return (time.perf_counter() - start) * 1e3 / args.steps

    kinds = {"single_label": lambda: step_ms(False), "distillation": lambda: step_ms(True), "teacher_fwd": teacher_ms}
    params = {
        name: sum(p.numel() for p in m.parameters()) / 1e6
        for name, m in (("student", model), ("teacher", teacher_model))
    }
    print(
        f"student {args.model} ({params['student']:.2f}M), teacher {args.teacher} ({params['teacher']:.2f}M), "
        f"{args.in_chans}x{args.imgsz}x{args.imgsz}, batch {args.batch_size}, {args.steps} steps/round, precision "
        f"{accelerator.mixed_precision}, {device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    for fn in kinds.values():  # warm-up: allocator, kernels, first-call costs
        fn()
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for r in range(args.rounds):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for name in order:
            times[name].append(kinds[name]())
        print(f"round {r + 1}: " + "  ".join(f"{n} {times[n][-1]:.1f} ms/step" for n in kinds), flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["distillation"] / median["single_label"]
    print(
        f"median: single-label {median['single_label']:.1f} ms/step  distillation {median['distillation']:.1f} "
        f"ms/step (x{ratio:.2f})  of which teacher forward {median['teacher_fwd']:.1f} ms/step"
    )
    if args.out:
        figures = {"args": vars(args) | {"out": str(args.out)}, "device": str(device), "params_M": params}
        figures |= {"ms_per_step": median, "rounds_ms": times, "distill_over_single": ratio}
        args.out.write_text(json.dumps(figures, indent=1))
    with contextlib.suppress(Exception):
        accelerator.end_training()


if __name__ == "__main__":
    main()
