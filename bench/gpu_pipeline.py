"""What feeds resnet50 on one GPU: the model's own ceiling against the real training loop fed by each loader.

One command for a GPU machine (about 5 minutes), figures to a JSON file:

1. resnet50, 224 px, bf16, channels_last, batch 256, on synthetic batches already on the GPU: eager and compiled
   (the ceiling);
2. the training loop's per-step path (`loop.train_one_epoch`: prepared model/optimizer/schedule, checkpointer
   bookkeeping, check_step) on the compiled model, fed from the same generated photo-sized JPEGs (500x375) by the
   torch loader (16 workers) and by DALI (hw_decoder_load 0.65 and 0.9); steady-state img/s and fraction of the
   ceiling;
3. what check_step's per-step host sync costs (the loop on synthetic batches, with and without it).

    python bench/gpu_pipeline.py --out gpu_pipeline.json            # on the GPU machine
    python bench/gpu_pipeline.py --cpu-smoke --out /tmp/smoke.json  # without a GPU: every part, tiny, on the CPU

Each part that fails records its error in the JSON and the rest goes on. Needs no wandb or mlxtend (--tracker none).
On the GPU machine install `datasets` and the DALI wheel first (see docs/benchmarks.md); without DALI its parts
record the import error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

sys.modules.setdefault("wandb", None)  # type: ignore[arg-type]  # timm imports it "in case"; not used here


def _write_one(job: tuple[str, int, int, int, int]) -> None:
    from PIL import Image

    path, i, classes, width, height = job
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    k = i % classes
    base = (np.sin(x / (17 + k)) + np.cos(y / (23 + i % 7))) * 60 + 128
    rgb = np.stack([base, base[::-1], base[:, ::-1]], axis=-1) + rng.normal(0, 12, (height, width, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_jpegs(root: Path, count: int, classes: int = 10, width: int = 500, height: int = 375) -> Path:
    """`root/train/class_k/i.jpg` photo-like JPEGs, written in parallel; reused when complete."""
    marker = root / f".complete-{count}-{width}x{height}"
    if marker.exists():
        return root
    jobs = []
    for i in range(count):
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{i}.jpg"), i, classes, width, height))
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_one, jobs, chunksize=32)
    marker.touch()
    return root


def ceiling(model, batch_size: int, imgsz: int, steps: int, device, channels_last: bool) -> float:
    """img/s of forward + backward + optimizer step on one synthetic batch already on the device."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch_size, 3, imgsz, imgsz, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Setup:
    """The engine's pieces, built as engine.train builds them (config -> accelerator -> model -> prepare)."""

    def __init__(self, args, root: Path, run_dir: Path):
        from trainer import data
        from trainer.config import CheckpointConfig, Config, DataConfig, ModelConfig, RunConfig, TrainConfig
        from trainer.report.reporter import Reporter
        from trainer.run.checkpointer import Checkpointer
        from trainer.train import launch, optim
        from trainer.train import loop as engine_loop
        from trainer.train.model import build_model

        self.args, self.data = args, data
        self.cfg = Config(
            data=DataConfig(data=str(root), imgsz=args.imgsz, workers=args.workers, hflip=0.5, loader="torch"),
            model=ModelConfig(model=args.model, channels_last=not args.cpu_smoke),
            train=TrainConfig(batch_size=args.batch_size, epochs=1000, compile=args.compile, log_every=10**9),
            run=RunConfig(tracker="none"),
        )
        if not args.cpu_smoke:
            self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, mixed_precision="bf16"))
        self.accelerator = launch.build_accelerator(self.cfg)
        self.splits, self.info = data.load_splits(self.cfg.data)
        model = build_model(self.cfg.model, num_classes=len(self.info.class_names), in_chans=3)
        self.pre = data.resolve_preprocess(self.cfg.data, model, 3)
        self.optimizer = optim.build_optimizer(self.cfg.optim, model)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.scheduler = optim.build_scheduler(self.cfg.optim, self.optimizer, 1000, 1000)
        self.reporter = Reporter(self.accelerator)
        self.checkpointer = Checkpointer(self.accelerator, run_dir, CheckpointConfig())
        self.loop = engine_loop

    def loader(self, name: str, hw_decoder_load: float = 0.65):
        cfg = dataclasses.replace(self.cfg.data, loader=name, workers=self.args.workers)
        spec = self.data.LoaderSpec(self.data.Backend(name, "bench"), self.pre, self.args.workers)
        dataset = self.data.Data(self.splits, self.info)
        train, _ = self.data.build_loaders(self.accelerator, dataset, cfg, spec, self.args.batch_size)  # sharded
        if name == "dali":
            train.stage.spec = dataclasses.replace(
                train.stage.spec, hw_decoder_load=hw_decoder_load, threads=self.args.dali_threads
            )
        return train

    def epoch_imgs_per_sec(self, loader, epochs: int) -> list[float]:
        """train_one_epoch over `loader`: img/s of each epoch after a warm-up epoch."""
        from trainer.run.checkpointer import TrainState

        state, rates = TrainState(), []
        for epoch in range(epochs + 1):
            loader.set_epoch(epoch + 1)
            self.reporter.epoch_start(epoch + 1, 1000, len(loader))
            parts = (self.accelerator, self.model, self.optimizer, self.scheduler, loader, state)
            loop = self.loop.Loop(*parts, self.reporter, self.checkpointer)
            stats = self.loop.train_one_epoch(loop, self.cfg.train)
            state.batches_in_epoch = 0
            if epoch:
                rates.append(stats.images / stats.seconds)
        return rates


def part(results: dict, out: Path, name: str, fn) -> None:
    """Run one measurement; on failure record the error and go on. The JSON is rewritten after every part, so a run
    stopped by its time limit still leaves what it measured."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # any failure of one part must leave the others running
        results[name] = {
            "error": f"{type(e).__name__}: {e}".split("\n")[0],
            "traceback": traceback.format_exc()[-2000:],
        }
    print(f"{name}: {json.dumps(results[name])[:300]} ({time.perf_counter() - start:.0f}s)", flush=True)
    out.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_pipeline.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU: checks every part runs")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=16, help="torch loader workers")
    parser.add_argument("--dali-threads", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader, after one warm-up epoch")
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "trainer-gpu-jpegs"))
    args = parser.parse_args()
    if args.cpu_smoke:
        args.images, args.model, args.imgsz, args.batch_size, args.epochs = 160, "test_resnet", 32, 16, 1
        args.workers, args.dali_threads = 0, 1
    args.compile = not args.cpu_smoke
    from trainer.data.backends import dali_missing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    results: dict = {"args": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    results["dali_missing"] = dali_missing()
    root = write_jpegs(Path(args.root) / str(args.images), args.images)
    steps = 3 if args.cpu_smoke else 30

    def synthetic_ceiling(compiled: bool):
        import timm

        model = timm.create_model(args.model, num_classes=1000).to(device)
        if not args.cpu_smoke:
            model = model.to(memory_format=torch.channels_last)
        if compiled:
            model = torch.compile(model)
        return {"imgs_per_sec": ceiling(model, args.batch_size, args.imgsz, steps, device, not args.cpu_smoke)}

    part(results, out, "ceiling_eager", lambda: synthetic_ceiling(False))
    if not args.cpu_smoke:
        part(results, out, "ceiling_compiled", lambda: synthetic_ceiling(True))
    top = results.get("ceiling_compiled", results["ceiling_eager"]).get("imgs_per_sec")

    with tempfile.TemporaryDirectory() as run_dir:
        setup: Setup | None = None

        def build():
            nonlocal setup
            setup = Setup(args, root, Path(run_dir))
            return {"train_images": setup.info.train_size, "mixed_precision": setup.accelerator.mixed_precision}

        part(results, out, "setup", build)

        def loop(name: str, hw: float = 0.65):
            rates = setup.epoch_imgs_per_sec(setup.loader(name, hw), args.epochs)
            best = max(rates)
            return {"imgs_per_sec": rates, "best": best, "fraction_of_ceiling": best / top if top else None}

        def check_step_cost():
            from trainer.data import Batch

            class Resident(list):
                """Batches already on the device: the loop's cost alone, without a loader."""

                def set_epoch(self, epoch: int) -> None:
                    pass

            batches = Resident(
                Batch(
                    torch.randn(args.batch_size, 3, args.imgsz, args.imgsz, device=device),
                    torch.randint(0, 10, (args.batch_size,), device=device),
                )
                for _ in range(steps)
            )
            with_sync = setup.epoch_imgs_per_sec(batches, 1)[-1]
            real = setup.checkpointer.check_step
            setup.checkpointer.check_step = lambda *a, **k: (False, False)  # the same step without the host sync
            try:
                without = setup.epoch_imgs_per_sec(batches, 1)[-1]
            finally:
                setup.checkpointer.check_step = real
            return {
                "with_check_step": with_sync,
                "without_check_step": without,
                "cost_fraction": 1 - with_sync / without,
            }

        if setup is not None:
            part(results, out, "loop_torch_loader", lambda: loop("torch"))
            for hw in (0.65, 0.9):
                part(results, out, f"loop_dali_hw{hw}", lambda hw=hw: loop("dali", hw))
            part(results, out, "check_step_sync", check_step_cost)
    dali = [results.get(f"loop_dali_hw{hw}", {}).get("best") or 0 for hw in (0.65, 0.9)]
    torch_best = results.get("loop_torch_loader", {}).get("best")
    if max(dali) and torch_best:
        results["dali_over_torch_loader"] = max(dali) / torch_best
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
