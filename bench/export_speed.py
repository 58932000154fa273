"""CPU inference speed of every export runtime against PyTorch eager, side by side in one run (issue 28).

resnet50 at 224 px (random weights: no download) on generated JPEGs, preprocessed by trainer's own eval pipeline:
  eager fp32            PyTorch eager, as `trainer predict` runs the .safetensors
  eager best            channels_last, and bf16 autocast where the CPU has AVX-512 BF16 / AMX
  ort fp32 / int8       onnxruntime on best.onnx / best_int8.onnx (QDQ, calibrated on the generated JPEGs)
  ov f32 / bf16 / int8  OpenVINO with INFERENCE_PRECISION_HINT f32 / bf16, and NNCF int8 (hint f32)
Batch 1 (ms) and batch --batch-size (img/s), every runtime at the same thread count, the runners timed in turn
within each round (so the machine's load touches all alike), medians over --rounds rounds after one warm-up call;
ratios to eager fp32. Also: `trainer benchmark`'s own figure (trainer.use.export.runtimes, tensors in and out) over
the bare runtime on the same file (goal >= 0.9), and `trainer predict` on a folder of JPEGs with the int8 OpenVINO
export against the .safetensors, alternating. Top-1 agreement with eager fp32 on the generated images stands in for
accuracy (random weights: no labels to score).

    python bench/export_speed.py                       # resnet50 224, batch 32, 3 rounds (~10 min on 2 cores)
    python bench/export_speed.py --quick               # 1 round, batch 8, fewer images: minutes
    python bench/export_speed.py --model test_resnet --imgsz 32 --quick --out /tmp/speed.json   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from trainer import data
from trainer.data import Preprocess
from trainer.run.weights import save_weights, weights_metadata
from trainer.use.export.artifacts import Target
from trainer.use.export.command import build_export
from trainer.use.export.runtimes import load_runtime
from trainer.use.export.to_openvino import compile_openvino
from trainer.use.inference import read_weights


def jpegs(folder: Path, count: int, size: int) -> list[Path]:
    """Smooth random colour fields with noise, saved as JPEG (decoding and resizing cost like photographs)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        pixels = np.clip(np.asarray(image, np.int16) + rng.integers(-20, 20, (size, size, 3)), 0, 255)
        paths.append(folder / f"img{i:04d}.jpg")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def preprocessed(paths: list[Path], pre: Preprocess) -> torch.Tensor:
    """The images as `trainer val` / `predict` feed them: the torch backend's eval transform."""
    spec = data.LoaderSpec(data.Backend("torch", "bench"), pre, workers=0)
    batches, _ = data.files_loader(paths, spec, 64, "cpu")
    return torch.cat([b.images for b in batches])


def has_bf16() -> bool:
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def bare_runners(files: dict[str, Path], threads: int) -> dict[str, tuple]:
    """name -> (callable on numpy, input kind) for the runtimes used directly, as a user deploying the file would."""
    import onnxruntime as ort

    runners = {}
    for name in ("ort fp32", "ort int8"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as trainer's runtime: no spinning
        session = ort.InferenceSession(str(files[name]), options, providers=["CPUExecutionProvider"])
        runners[name] = (lambda x, s=session: s.run(["logits"], {"images": x})[0], "numpy")
    for name, hint in (("ov f32", "f32"), ("ov bf16", "bf16"), ("ov int8", "f32")):
        compiled, ran = compile_openvino(files[name] / "model.xml", hint, threads)
        request = compiled.create_infer_request()
        output = compiled.output(0)
        runners[f"{name} (ran {ran})" if ran != hint else name] = (
            lambda x, r=request, o=output: r.infer({0: x}, share_inputs=True)[o].copy(),
            "numpy",
        )
    return runners


def time_side_by_side(runners: dict, x1: torch.Tensor, xb: torch.Tensor, rounds: int, min_seconds: float) -> dict:
    """{name: {"ms_b1": median, "img_s_bN": median}}; one warm-up call each size, runners in turn per round."""
    inputs = {"torch": (x1, xb), "numpy": (x1.numpy(), xb.numpy())}
    calls, lat, thr = {}, {n: [] for n in runners}, {n: [] for n in runners}
    with torch.inference_mode():
        for name, (run, kind) in runners.items():
            for x in inputs[kind]:
                start = time.perf_counter()
                run(x)
                calls[(name, len(x))] = max(1, min(100, int(min_seconds / max(time.perf_counter() - start, 1e-6))))
        for _ in range(rounds):
            for name, (run, kind) in runners.items():
                for x, out in zip(inputs[kind], (lat, thr), strict=True):
                    n = calls[(name, len(x))]
                    start = time.perf_counter()
                    for _ in range(n):
                        run(x)
                    seconds = (time.perf_counter() - start) / n
                    out[name].append(seconds * 1e3 if out is lat else len(x) / seconds)
    return {n: {"ms_b1": statistics.median(lat[n]), "img_s": statistics.median(thr[n])} for n in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=128, help="generated JPEGs (calibration, agreement, predict)")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="every runtime's threads (default: CPUs)"
    )
    parser.add_argument("--quick", action="store_true", help="1 round, batch 8, 32 images, shorter timed calls")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch_size, args.images = 1, 8, 32
    torch.set_num_threads(args.threads)
    min_seconds = 0.5 if args.quick else 2.0
    work = Path(tempfile.mkdtemp(prefix="export_speed-"))
    pre = Preprocess(args.imgsz, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)
    model = timm.create_model(args.model, num_classes=1000).eval()
    weights = work / "run" / "weights" / "best.safetensors"
    weights.parent.mkdir(parents=True)
    save_weights(model.state_dict(), weights, weights_metadata(args.model, [f"c{i}" for i in range(1000)], pre))
    trained = read_weights(weights)
    paths = jpegs(work / "images", args.images, round(args.imgsz / 0.875) + 16)
    images = preprocessed(paths, pre)
    files = {}
    for name, target in (
        ("ort fp32", Target("onnx")),
        ("ort int8", Target("onnx", int8=True)),
        ("ov f32", Target("openvino")),
        ("ov bf16", Target("openvino", bf16=True)),
        ("ov int8", Target("openvino", int8=True)),
    ):
        files[name] = target.path_for(weights, work / name.replace(" ", "_"))
        files[name].parent.mkdir(parents=True, exist_ok=True)
        build_export(target, model, trained, files[name], images if target.int8 else None)

    cl_model = timm.create_model(args.model, num_classes=1000).eval().to(memory_format=torch.channels_last)
    cl_model.load_state_dict(model.state_dict())
    bf16 = has_bf16()

    def eager_best(x):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return cl_model(x.contiguous(memory_format=torch.channels_last))

    runners = {"eager fp32": (model, "torch"), "eager best": (eager_best, "torch")}
    runners |= bare_runners(files, args.threads)
    ours = {}  # trainer's wrappers on the same files: tensors in, tensors out, as `trainer benchmark` times them
    for name in ("ort fp32", "ov int8"):
        meta = {**trained.metadata, **_read(files[name]), "threads": str(args.threads)}
        ours[f"trainer: {name}"] = (load_runtime(files[name], meta), "torch")
    runners |= ours
    x1, xb = images[:1].clone(), images[: args.batch_size].clone()
    if len(xb) < args.batch_size:
        xb = images.repeat(args.batch_size // len(images) + 1, 1, 1, 1)[: args.batch_size].clone()
    figures = time_side_by_side(runners, x1, xb, args.rounds, min_seconds)
    with torch.inference_mode():
        reference = model(images).argmax(1)
        for name, (run, kind) in runners.items():
            out = run(images if kind == "torch" else images.numpy())
            out = out.float() if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
            figures[name]["top1_agree"] = float((out.argmax(1) == reference).float().mean())
    base = figures["eager fp32"]
    print(
        f"{args.model} {args.imgsz}px, {args.threads} thread(s), batch 1 and {args.batch_size}, {args.rounds} round(s)"
    )
    print(f"{'runner':<22} {'ms (b1)':>9} {'x eager':>8} {'img/s':>9} {'x eager':>8} {'top-1 agree':>12}")
    for name, f in figures.items():
        print(
            f"{name:<22} {f['ms_b1']:9.2f} {base['ms_b1'] / f['ms_b1']:8.2f} {f['img_s']:9.1f} "
            f"{f['img_s'] / base['img_s']:8.2f} {f['top1_agree']:12.3f}"
        )
    overhead = {n: figures[f"trainer: {n}"]["img_s"] / _bare(figures, n)["img_s"] for n in ("ort fp32", "ov int8")}
    print("trainer's runtime wrapper / bare runtime, img/s: " + ", ".join(f"{n} {r:.2f}" for n, r in overhead.items()))
    predict_speed = predict_side_by_side(weights, files["ov int8"], work / "images", 1 if args.quick else 2)
    print(
        f"trainer predict on {len(paths)} JPEGs: .safetensors {predict_speed['safetensors']:.1f} img/s, "
        f"best_int8_openvino/ {predict_speed['openvino int8']:.1f} img/s "
        f"(x{predict_speed['openvino int8'] / predict_speed['safetensors']:.2f})"
    )
    if args.out:
        machine = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "bf16": bf16}
        machine["load"] = os.getloadavg()
        result = {"args": vars(args) | {"out": str(args.out)}, "machine": machine, "figures": figures}
        result |= {"wrapper_over_bare": overhead, "predict_img_s": predict_speed}
        args.out.write_text(json.dumps(result, indent=1))


def _read(path: Path) -> dict[str, str]:
    from trainer.use.export.artifacts import artifact_kind, read_artifact_metadata

    return read_artifact_metadata(path, artifact_kind(path))


def _bare(figures: dict, name: str) -> dict:
    return next(f for n, f in figures.items() if n == name or n.startswith(f"{name} (ran"))


def predict_side_by_side(weights: Path, ov_int8: Path, folder: Path, rounds: int) -> dict[str, float]:
    """`trainer predict` (in-process, wall clock including its start-up) on the folder, the two weights alternating."""
    from trainer.run.rundirs import RunFolder, release_run_dirs
    from trainer.use.predict import predict

    seconds: dict[str, list[float]] = {"safetensors": [], "openvino int8": []}
    count = len(list(folder.glob("*.jpg")))
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        for _ in range(rounds):
            for name, path in (("safetensors", weights), ("openvino int8", ov_int8)):
                start = time.perf_counter()
                predict(str(path), [str(folder)], workers=0, folder=RunFolder(str(folder.parent / "predict")))
                seconds[name].append(time.perf_counter() - start)
                release_run_dirs()
    return {name: count / statistics.median(s) for name, s in seconds.items()}


if __name__ == "__main__":
    main()
