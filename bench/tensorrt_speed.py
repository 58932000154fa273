"""TensorRT FP16 against the compiled PyTorch model on one GPU, side by side (issue 28; a part of gpu_checks.sh).

resnet50 at 224 px (random weights): `torch.compile` (channels_last, fp16 autocast) vs the engine `trainer export
--format engine --half` builds from the ONNX graph (trainer.use.export.to_tensorrt), run through trainer's own
runtime module (as `trainer val` / `predict` / `benchmark` run it). Batch 1 (ms) and --batch-size (img/s), CUDA-synced,
the two timed in turn within each round, medians over rounds after warm-up; top-1 agreement of the engine with
eager fp32 on random inputs and the max |logit difference|.

    python bench/tensorrt_speed.py --out trt.json               # on a GPU with tensorrt-cu13 installed
    python bench/tensorrt_speed.py --cpu-smoke --out trt.json   # no GPU: checks that the engine is refused in one line
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from trainer.config import UserError
from trainer.data import Preprocess
from trainer.run.weights import save_weights, weights_metadata
from trainer.use.export.artifacts import Target
from trainer.use.export.command import build_export, refuse_unsupported
from trainer.use.export.runtimes import load_runtime
from trainer.use.inference import read_weights


def timed(run, x: torch.Tensor, calls: int) -> float:
    """Seconds per call, CUDA-synced."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--imgsz", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50, help="calls per timed measurement")
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: the engine must be refused in one line")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tensorrt_speed-"))
    model_name, imgsz = ("test_resnet", 32) if args.cpu_smoke else (args.model, args.imgsz)
    pre = Preprocess(imgsz, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)
    model = timm.create_model(model_name, num_classes=1000).eval()
    weights = work / "best.safetensors"
    save_weights(model.state_dict(), weights, weights_metadata(model_name, [f"c{i}" for i in range(1000)], pre))
    trained = read_weights(weights)
    target = Target("engine", half=True)
    result: dict = {"model": model_name, "imgsz": imgsz, "batch_size": args.batch_size}
    if not torch.cuda.is_available():
        try:
            refuse_unsupported(target, trained)
            result["error"] = "no GPU, yet the engine was not refused"
        except UserError as e:
            result["refused_on_cpu"] = str(e)
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        raise SystemExit(0 if "refused_on_cpu" in result else 1)
    try:
        import tensorrt

        result["tensorrt"] = tensorrt.__version__
    except ImportError:
        result["skipped"] = 'tensorrt not installed (pip install -e ".[tensorrt]"); compiled PyTorch timed alone'
    gpu = copy.deepcopy(model).cuda().to(memory_format=torch.channels_last)  # `model` stays on the CPU to export
    compiled = torch.compile(gpu)

    def torch_fp16(x):
        with torch.autocast("cuda", torch.float16):
            return compiled(x.contiguous(memory_format=torch.channels_last))

    runners = {"torch.compile fp16": torch_fp16}
    if "tensorrt" in result:
        start = time.perf_counter()
        engine = work / "best.engine"
        build_export(target, model, trained, engine, None)
        result["engine_build_s"] = time.perf_counter() - start
        result["engine_mb"] = engine.stat().st_size / 1e6
        meta = json.loads(engine.with_name("best.engine.json").read_text())
        runners["tensorrt fp16 (trainer runtime)"] = load_runtime(engine, meta)
    x1 = torch.randn(1, 3, imgsz, imgsz, device="cuda")
    xb = torch.randn(args.batch_size, 3, imgsz, imgsz, device="cuda")
    lat: dict[str, list[float]] = {n: [] for n in runners}
    thr: dict[str, list[float]] = {n: [] for n in runners}
    with torch.inference_mode():
        for run in runners.values():
            for x in (x1, xb, x1, xb):
                run(x)  # warm-up (torch.compile compiles each shape here)
        for _ in range(args.rounds):
            for name, run in runners.items():
                lat[name].append(timed(run, x1, args.calls) * 1e3)
                thr[name].append(args.batch_size / timed(run, xb, args.calls))
        reference = copy.deepcopy(model).cuda()(xb)
        for name, run in runners.items():
            out = run(xb).float()
            result[f"{name} top1_agree"] = float((out.argmax(1) == reference.argmax(1)).float().mean())
            result[f"{name} max_logit_diff"] = float((out - reference).abs().max())
    for name in runners:
        result[name] = {"ms_b1": statistics.median(lat[name]), "img_s": statistics.median(thr[name])}
    result["gpu"] = torch.cuda.get_device_name()
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
