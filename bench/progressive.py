"""Progressive resizing: what it saves in time and costs in accuracy, and img/s per size on a GPU.

Default: the default run (`python -m trainer train`: MNIST-5k, resnet10t, 32 px, 5 epochs) with and without
`--progressive 16`, side by side in one run, rounds alternating (fixed, progressive, progressive, fixed, ...) so that
machine load hits both alike. Prints each run's wall time and final val/top1, the medians, the time ratio (goal:
<= 0.8) and the top-1 difference in percentage points (goal: within 0.5).

    python bench/progressive.py --rounds 3 --out progressive.json
    python bench/progressive.py --gpu-sizes --out sizes.json      # on a GPU: resnet50 img/s at 160, 192, 224 px
    python bench/progressive.py --gpu-sizes --cpu-smoke --out /tmp/s.json

--gpu-sizes: resnet50 (bf16, channels-last, batch 256, eager) trained by the real loop on generated photo-sized JPEGs
(bench/gpu_pipeline.py's), fed by the loader of a --progressive 160 run at --imgsz 224 whose schedule gives 160, 192
and 224 px in turn (DALI when installed, else the torch loader): img/s at each size after a warm-up epoch.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_once(project: Path, name: str, extra: list[str]) -> dict:
    """One `trainer train` in a fresh process: its wall time and last epoch's val/top1."""
    cmd = [sys.executable, "-m", "trainer", "train", "--tracker", "none", "--project", str(project), "--name", name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *extra], cwd=project, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd + extra)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    with open(project / name / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {"seconds": seconds, "top1": float(rows[-1]["val/top1"]), "imgsz": [int(r["imgsz"]) for r in rows]}


def side_by_side(args) -> dict:
    kinds = {"fixed": [], "progressive": ["--progressive", str(args.start_px)]}
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            order = list(kinds) if n % 2 == 0 else list(kinds)[::-1]
            for kind in order:
                result = train_once(Path(tmp), f"{kind}{n}", [*kinds[kind], *epochs, *args.extra])
                runs[kind].append(result)
                print(
                    f"round {n + 1} {kind}: {result['seconds']:.1f}s, top1 {result['top1']:.4f}, sizes "
                    f"{result['imgsz']}",
                    flush=True,
                )
    median = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "top1")} for k, v in runs.items()}
    ratio = median["progressive"]["seconds"] / median["fixed"]["seconds"]
    ratios = [p["seconds"] / f["seconds"] for p, f in zip(runs["progressive"], runs["fixed"], strict=True)]
    top1_pp = 100 * (median["progressive"]["top1"] - median["fixed"]["top1"])
    print(
        f"median: fixed {median['fixed']['seconds']:.1f}s top1 {median['fixed']['top1']:.4f}; progressive "
        f"{median['progressive']['seconds']:.1f}s top1 {median['progressive']['top1']:.4f}; time ratio {ratio:.2f} "
        f"(goal <= 0.8), top1 {top1_pp:+.2f} pp (goal within 0.5)"
    )
    return {
        "runs": runs,
        "median": median,
        "time_ratio": ratio,
        "round_ratios": ratios,
        "top1_pp": top1_pp,
        "load_average": os.getloadavg(),
    }


class AtSize:
    """A loader held at one epoch's size: gpu_pipeline.Setup counts its epochs from 1 on every call."""

    def __init__(self, loader, epoch: int):
        self.loader, self.epoch = loader, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)

    def set_epoch(self, _epoch: int) -> None:
        self.loader.set_epoch(self.epoch)


def gpu_sizes(args) -> dict:
    """img/s of resnet50 at each size of a 160 -> 192 -> 224 ramp (see the module docstring)."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_pipeline import Setup, write_jpegs

    from trainer import data
    from trainer.data.backends import dali_missing
    from trainer.data.resolution import SizeSchedule

    smoke = args.cpu_smoke
    imgsz, start_px, step = (32, 16, 8) if smoke else (224, 160, 32)
    images = 160 if smoke else args.images
    options = argparse.Namespace(
        cpu_smoke=smoke,
        imgsz=imgsz,
        model="test_resnet" if smoke else "resnet50",
        workers=0 if smoke else 16,
        batch_size=16 if smoke else 256,
        compile=False,
        dali_threads=1 if smoke else 8,
    )
    root = write_jpegs(Path(tempfile.gettempdir()) / "trainer-gpu-jpegs" / str(images), images)
    loader = "dali" if not dali_missing() else "torch"
    schedule = SizeSchedule(start_px, imgsz, (1, 3), step)  # epochs 1, 2, 3: 160, 192, 224
    with tempfile.TemporaryDirectory() as run_dir:
        setup = Setup(options, root, Path(run_dir))
        cfg = dataclasses.replace(setup.cfg.data, loader=loader, progressive=start_px)
        spec = data.LoaderSpec(data.Backend(loader, "bench"), setup.pre, options.workers)
        dataset = data.Data(setup.splits, setup.info)
        train, _ = data.build_loaders(setup.accelerator, dataset, cfg, spec, options.batch_size, schedule)
        result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "loader": loader}
        for epoch in (1, 2, 3):
            px = schedule.size(epoch)
            rates = setup.epoch_imgs_per_sec(AtSize(train, epoch), 1)  # one warm-up epoch, one timed
            result[f"imgs_per_sec_{px}"] = rates[-1]
            print(f"{px} px: {rates[-1]:.0f} img/s", flush=True)
        full = result[f"imgs_per_sec_{imgsz}"]
        result["speedup_vs_full"] = {px: result[f"imgs_per_sec_{px}"] / full for px in schedule.sizes(3)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (each: one run of each kind)")
    parser.add_argument("--start-px", type=int, default=16, help="--progressive START_PX")
    parser.add_argument("--epochs", type=int, default=0, help="--epochs of both runs; 0: the default (5)")
    parser.add_argument("--gpu-sizes", action="store_true", help="resnet50 img/s at 160, 192, 224 px instead")
    parser.add_argument("--cpu-smoke", action="store_true", help="--gpu-sizes tiny, on the CPU")
    parser.add_argument("--images", type=int, default=2000, help="--gpu-sizes: generated JPEGs")
    parser.add_argument("--out", default="")
    parser.add_argument("extra", nargs="*", help="more `trainer train` flags for both runs (after --)")
    args = parser.parse_args()
    result = gpu_sizes(args) if args.gpu_sizes else side_by_side(args)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
