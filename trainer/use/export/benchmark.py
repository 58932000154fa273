"""`trainer benchmark`: export trained weights to each format that runs here, validate each on the run's validation
images against PyTorch, time each, and print one table; a format that fails is a row with its reason.

Timing: every runtime at the same thread count (PyTorch's, `torch.get_num_threads()`); warm-up calls excluded;
batch-1 latency (ms/img) and batched throughput (img/s at --batch-size), each the median over --rounds rounds, the
formats timed in turn within each round so that a machine's changing load touches all of them alike.
"""

from __future__ import annotations

import csv
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.config import UserError
from trainer.run.rundirs import RunFolder, make_run_dir
from trainer.run.writes import atomic_file
from trainer.use.export import checks
from trainer.use.export.artifacts import Target
from trainer.use.export.command import build_export, refuse_unsupported, size_mb
from trainer.use.export.runtimes import load_runtime
from trainer.use.export.to_torch import coreml_runs_here
from trainer.use.inference import load_model, read_weights

DEFAULT_FORMATS = "torchscript,onnx,onnx-int8,openvino,openvino-bf16,openvino-int8"  # + engine-fp16 on a GPU
ROUND_SECONDS = 0.3  # each timed measurement runs at least this long (or MAX_CALLS calls)
MAX_CALLS = 200
BENCHMARK_FOLDER = RunFolder("runs/benchmark")  # --project runs/benchmark --name exp


@dataclass
class Row:
    format: str
    status: str = "ok"
    size_mb: float | None = None
    metric: float | None = None  # top-1 (mAP for multi-label) on the check images
    delta_pp: float | None = None
    ms_per_img: float | None = None  # batch 1
    imgs_per_sec: float | None = None  # at --batch-size


def benchmark(
    weights: str,
    formats: str | None = None,
    data_name: str | None = None,
    folder: RunFolder = BENCHMARK_FOLDER,
    *,
    check_images: int | None = None,
    batch_size: int = 32,
    rounds: int = 5,
    calib_images: int = 300,
    tracker: str = "none",
) -> tuple[Path, list[Row]]:
    """Export, validate and time each of `formats` (comma-separated labels, see artifacts.Target.parse); write
    benchmark.csv (and the exports) to a run folder; print the table."""
    trained = read_weights(weights)
    if trained.exported:
        raise UserError(f"--weights {weights}: benchmark exports from the .safetensors weights; pass those")
    labels = formats or DEFAULT_FORMATS + (",engine-fp16" if torch.cuda.is_available() else "")
    targets = [Target.parse(label.strip()) for label in labels.split(",") if label.strip()]
    run_dir = make_run_dir(folder)
    model = load_model(trained)
    checked = checks.check_data(model, trained, data_name, check_images)
    threads = torch.get_num_threads()
    print(f"benchmark: {trained.describe()} on {checked.images} {checked.source}; {threads} thread(s)", flush=True)
    baseline = checks.compare(model, checked)
    delta = 0.0 if checked.real else None
    rows = [Row("pytorch", size_mb=size_mb(trained.path), metric=_metric(baseline), delta_pp=delta)]
    runners: dict[str, torch.nn.Module] = {"pytorch": model}
    calibration: tuple[torch.Tensor, str] | UserError | None = None
    for target in targets:
        row = Row(target.label)
        rows.append(row)
        try:
            refuse_unsupported(target, trained)
            if target.int8 and calibration is None:
                try:
                    calibration = checks.calibration_images(trained, data_name, calib_images)
                except UserError as e:
                    calibration = e
            if target.int8 and isinstance(calibration, UserError):
                raise calibration
            path = target.path_for(trained.path, run_dir, distinct=True)
            build_export(target, model, trained, path, calibration[0] if target.int8 else None)
            row.size_mb = size_mb(path)
            if target.fmt == "coreml" and not coreml_runs_here():
                row.status = "converted; not run: CoreML runs on macOS only"
                continue
            runtime = load_runtime(path, {**_read(path), "threads": str(threads)})
            comparison = checks.compare(runtime, checked)
            row.metric = _metric(comparison)
            row.delta_pp = comparison.delta_pp if comparison.metric else None
            beyond = checks.within_bound(comparison, target.precision)
            row.status = f"failed: {beyond}" if beyond else "ok"
            runners[target.label] = runtime
        except Exception as e:  # a format that fails is a row with its reason, never the end of the table
            row.status = "failed: " + (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not isinstance(e, UserError):
                row.status = f"failed: {type(e).__name__}: {row.status[8:]}"
    time_all(runners, rows, trained.pre, batch_size, rounds)
    write_csv(rows, run_dir / "benchmark.csv")
    print(format_table(rows, baseline.metric or "top-1", batch_size))
    if tracker == "wandb":
        from trainer.report.trackers import log_table_to_wandb

        config = {"weights": str(trained.path), "batch_size": batch_size, "rounds": rounds, "threads": threads}
        print(log_table_to_wandb(run_dir, "trainer-benchmark", "benchmark", [asdict(r) for r in rows], config))
    print(f"Results saved to {run_dir}", flush=True)
    return run_dir, rows


def _read(path: Path) -> dict[str, str]:
    from trainer.use.export.artifacts import artifact_kind, read_artifact_metadata

    return read_artifact_metadata(path, artifact_kind(path))


def _metric(comparison: checks.Comparison) -> float | None:
    return comparison.exported if comparison.metric else None


def time_all(runners: dict[str, torch.nn.Module], rows: list[Row], pre, batch_size: int, rounds: int) -> None:
    """Fill ms_per_img (batch 1) and imgs_per_sec (batch `batch_size`): medians over `rounds`, the runners timed in
    turn within each round, after one warm-up call at each size."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(batch_size, pre.in_chans, pre.imgsz, pre.imgsz, generator=generator)
    single = batch[:1].clone()
    calls: dict[tuple[str, int], int] = {}
    with torch.inference_mode():
        for name, run in runners.items():
            for x in (single, batch):
                start = time.perf_counter()
                run(x)  # warm-up, and the cost of one call: how many calls make a round
                seconds = max(time.perf_counter() - start, 1e-6)
                calls[(name, len(x))] = max(1, min(MAX_CALLS, int(ROUND_SECONDS / seconds)))
        latency: dict[str, list[float]] = {name: [] for name in runners}
        throughput: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                latency[name].append(_seconds_per_call(run, single, calls[(name, 1)]) * 1e3)
                throughput[name].append(batch_size / _seconds_per_call(run, batch, calls[(name, batch_size)]))
    for row in rows:
        if row.format in runners:
            row.ms_per_img = statistics.median(latency[row.format])
            row.imgs_per_sec = statistics.median(throughput[row.format])


def _seconds_per_call(run, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        run(x)
    return (time.perf_counter() - start) / calls


def write_csv(rows: list[Row], path: Path) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["format", "status", "size_mb", "metric", "delta_pp", "ms_per_img", "imgs_per_sec"])
        for r in rows:
            values = (r.size_mb, r.metric, r.delta_pp, r.ms_per_img, r.imgs_per_sec)
            writer.writerow([r.format, r.status, *("" if v is None else f"{v:.6g}" for v in values)])


def format_table(rows: list[Row], metric: str, batch_size: int) -> str:
    """format | status | size MB | top-1 | delta vs PyTorch | ms/img | img/s, one line each."""
    heads = ("format", "status", "size MB", metric, "vs PyTorch", "ms/img (b1)", f"img/s (b{batch_size})")
    cells = [
        (
            r.format,
            r.status if len(r.status) <= 60 else r.status[:57] + "...",
            _cell(r.size_mb, ".1f"),
            _cell(r.metric, ".4f"),
            _cell(r.delta_pp, "+.2f", " pp"),
            _cell(r.ms_per_img, ".2f"),
            _cell(r.imgs_per_sec, ".1f"),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"
