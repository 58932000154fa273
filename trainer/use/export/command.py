"""`trainer export`: trained weights to one format, built in a hidden folder beside the target, verified on the
run's validation images through the format's own runtime, and only then renamed into place.

A failed export (a refused option, a full disk, a check beyond its bound, a kill) leaves an earlier one intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from trainer.config import UserError
from trainer.run.weights import match_umask
from trainer.run.writes import disk_errors, scratch_dir
from trainer.use.export import checks
from trainer.use.export.artifacts import INT8_FORMATS, Target, artifact_metadata, engine_sidecar
from trainer.use.export.runtimes import describe_runtime, load_runtime
from trainer.use.inference import TrainedWeights, load_model, read_weights

KEPT = "an earlier export there is kept as it was"  # exports are built beside the target, then renamed into place
CALIBRATION_IMAGES = 300


def refuse_unsupported(target: Target, trained: TrainedWeights) -> None:
    """One line for an option the format cannot take, before anything is loaded or written."""
    from trainer.use.export.to_tensorrt import refuse_without_gpu

    if trained.exported:
        raise UserError(f"--weights {trained.path}: already an export; export from the .safetensors weights")
    if target.int8 and target.fmt not in INT8_FORMATS:
        raise UserError(f"--int8 is for --format onnx or openvino, not {target.fmt}")
    if target.bf16 and target.fmt != "openvino":
        raise UserError("--bf16 is for --format openvino (an OpenVINO precision hint)")
    if sum((target.int8, target.half, target.bf16)) > 1:
        raise UserError("--int8, --half and --bf16 exclude each other; pick one")
    if target.half and target.fmt not in ("onnx", "openvino", "engine"):
        raise UserError(f"--half is for --format onnx (GPU), openvino or engine, not {target.fmt}")
    if target.half and target.fmt == "onnx" and not torch.cuda.is_available():
        raise UserError(
            "--format onnx --half traces the model in fp16 on a GPU and there is none here; on a CPU use "
            "--format openvino --half (fp16 weights) or --int8"
        )
    if target.fmt == "engine":
        refuse_without_gpu()


def export(
    weights: str,
    fmt: str = "onnx",
    output: str | None = None,
    data_name: str | None = None,
    check_images: int | None = None,
    push_to_hub: str | None = None,
    *,
    half: bool = False,
    int8: bool = False,
    bf16: bool = False,
    calib_images: int = CALIBRATION_IMAGES,
) -> Path:
    """Export `weights` as `fmt` to `output` (default: beside the weights, best.onnx etc.), verified against
    PyTorch on the validation split (the first `check_images` when given). Returns the path written."""
    trained = read_weights(weights)
    target = Target(fmt, int8=int8, half=half, bf16=bf16)
    refuse_unsupported(target, trained)
    if push_to_hub and fmt != "hf":
        raise UserError("--push-to-hub uploads the hf format; add --format hf")
    if push_to_hub:
        from trainer.use.export.hub import check_hub_credentials

        check_hub_credentials()
    out = Path(output) if output else target.path_for(trained.path)
    model = load_model(trained)
    if fmt == "hf":
        return _export_hf(model, trained, out, data_name, check_images, push_to_hub)
    calibration = checks.calibration_images(trained, data_name, calib_images) if int8 else None
    if calibration is not None:
        print(f"int8: calibrating on {calibration[1]} (evaluation preprocessing)", flush=True)
    checked = checks.check_data(model, trained, data_name, check_images)
    with disk_errors(out, KEPT), scratch_dir(out) as build:
        built = build / out.name
        build_export(target, model, trained, built, calibration and calibration[0])
        comparison, runtime = verify(target, built, trained, checked)
        move_into_place(built, out)
    size = size_mb(out)
    print(f"{target.label} {out} ({size:.1f} MB): {describe_format(target, trained)}")
    if comparison.images:
        print(f"checked on {comparison.images} {checked.source} through {runtime}: {comparison.line()}")
    return out


def build_export(
    target: Target, model: torch.nn.Module, trained: TrainedWeights, out: Path, calibration: torch.Tensor | None
) -> None:
    """Write `target`'s file (or folder) at `out` from the PyTorch model, with the metadata inside."""
    pre = trained.pre
    meta = artifact_metadata(trained.metadata, trained.path, target)
    if target.fmt == "torchscript":
        from trainer.use.export.to_torch import export_torchscript

        export_torchscript(model, pre.in_chans, pre.imgsz, meta, out)
    elif target.fmt == "coreml":
        from trainer.use.export.to_torch import export_coreml

        export_coreml(model, pre.in_chans, pre.imgsz, meta, out)
    elif target.fmt == "openvino":
        from trainer.use.export.to_openvino import export_openvino

        export_openvino(model, pre.in_chans, pre.imgsz, meta, out, target.precision, calibration)
    elif target.fmt == "onnx":
        from trainer.use.export.to_onnx import export_onnx, quantize_onnx

        fp32 = out.with_name(out.stem + ".fp32.onnx") if target.int8 else out
        export_onnx(model, pre.in_chans, pre.imgsz, meta, fp32, half=target.half)
        if target.int8:
            quantize_onnx(fp32, out, calibration, meta)
            fp32.unlink()
    elif target.fmt == "engine":
        import json

        from trainer.use.export.to_onnx import export_onnx
        from trainer.use.export.to_tensorrt import build_engine

        graph = out.with_suffix(".onnx")
        export_onnx(model, pre.in_chans, pre.imgsz, meta, graph)
        build_engine(graph, pre.in_chans, pre.imgsz, out, target.half)
        graph.unlink()
        engine_sidecar(out).write_text(json.dumps(meta, indent=1))
    else:
        raise UserError(f"--format {target.fmt}: unknown")
    match_umask(out)


def verify(target: Target, built: Path, trained: TrainedWeights, checked: checks.CheckData):
    """Run the export through its own runtime on the check images; refuse it (UserError) beyond its bound.
    Returns (comparison, the runtime's description). CoreML off macOS: converted, not run (said so)."""
    from trainer.use.export.to_torch import coreml_runs_here

    if target.fmt == "coreml" and not coreml_runs_here():
        print("coreml: converted; not run here: CoreML prediction needs macOS (check it there with trainer val)")
        return checks.Comparison("", 0.0, 0.0, float("nan"), 0, 0), "nothing (CoreML needs macOS)"
    meta = artifact_metadata(trained.metadata, trained.path, target)
    if target.fmt == "openvino":
        from trainer.use.export.to_openvino import HINTS

        meta["inference_precision"] = HINTS[target.precision]
    runtime = load_runtime(built, meta)
    comparison = checks.compare(runtime, checked)
    failure = checks.within_bound(comparison, target.precision)
    if failure:
        raise UserError(f"{failure} on {comparison.images} {checked.source}; not written ({KEPT})")
    return comparison, describe_runtime(runtime)


def move_into_place(built: Path, out: Path) -> None:
    """Rename the checked export (file, folder, and its sidecar or external-data files) to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Companions first (an ONNX external-data file, an engine's .json), the model last: when it appears, all is there.
    for file in sorted(built.parent.iterdir(), key=lambda p: p == built):
        target = out.parent / (out.name if file == built else file.name)
        if file.is_dir():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if target.exists():
                os.rename(target, old)
            os.rename(file, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(file, target)


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def describe_format(target: Target, trained: TrainedWeights) -> str:
    pre = trained.pre
    text = f"input 'images' (batch, {pre.in_chans}, {pre.imgsz}, {pre.imgsz}) {target.precision}"
    text += f", output 'logits' (batch, {trained.num_classes})"
    if trained.multilabel:
        text += f", a sigmoid per label (threshold {trained.threshold:g})"
    return text + "; classes and preprocessing inside"


def _export_hf(model, trained: TrainedWeights, out: Path, data_name, check_images, repo_id) -> Path:
    from trainer.run.writes import atomic_dir
    from trainer.use.export import hub

    checked = checks.check_data(model, trained, data_name, check_images)
    with disk_errors(out, KEPT), atomic_dir(out) as build:
        reloaded = hub.export_hf(model, trained, build)
        comparison = checks.compare(reloaded, checked)
        measured = f"{comparison.metric} {comparison.exported:.4f} on {comparison.images} {checked.source}"
        card = hub.model_card(trained, model, measured if checked.real else "", checked.source, str(out), repo_id)
        hub.write_card(build, card)
    print(
        f"timm hub folder {out} (config.json, model.safetensors, README.md); loads with "
        f"timm.create_model('local-dir:{out}', pretrained=True): {comparison.line()}"
    )
    if repo_id:
        url = hub.push(model, trained, repo_id, card)
        print(f"pushed to {url}; load with timm.create_model('hf-hub:{repo_id}', pretrained=True)")
    return out
