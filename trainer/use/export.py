"""`trainer export`: a trained weights file as ONNX (checked against onnxruntime) or as a timm hub folder.

The .safetensors file itself already loads in plain timm (see docs/use.md); these formats take it elsewhere. Both
are built and checked in a hidden folder beside the target, then renamed into place: a failed export (a full disk,
a failed check, a kill) leaves an earlier one intact.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from trainer import data
from trainer.config import UserError
from trainer.run.weights import match_umask
from trainer.run.writes import atomic_dir, disk_errors, scratch_dir
from trainer.use.inference import TrainedWeights, check_classes, data_config_for, load_model, read_weights

FORMATS = ("onnx", "hf")
ONNX_GOAL = 1e-4  # max |logit difference| to PyTorch in fp32
INSTALL_HINT = 'pip install -e ".[export]" in the trainer checkout'
KEPT = "an earlier export there is kept as it was"  # exports are built beside the target, then renamed into place


def export(
    weights: str,
    fmt: str = "onnx",
    output: str | None = None,
    data_name: str | None = None,
    check_images: int = 64,
    push_to_hub: str | None = None,
) -> Path:
    """Export `weights` in format `fmt` ("onnx" or "hf") to `output` (default: beside the weights). Returns it."""
    trained = read_weights(weights)
    if push_to_hub and fmt != "hf":
        raise UserError("--push-to-hub uploads the hf format; add --format hf")
    if push_to_hub:
        _check_hub_credentials()
    out = Path(output) if output else trained.path.with_name(trained.path.stem + {"onnx": ".onnx", "hf": "_hf"}[fmt])
    model = load_model(trained)
    if fmt == "onnx":
        images, source = check_inputs(trained, data_name, check_images)
        with disk_errors(out, KEPT), scratch_dir(out) as build:
            export_onnx(model, trained, build / out.name)
            diff, agree = check_onnx(model, build / out.name, images)
            _move_files(build, out.parent)
        print(
            f"ONNX {out} ({out.stat().st_size / 1e6:.1f} MB), input 'images' (batch, {trained.pre.in_chans}, "
            f"{trained.pre.imgsz}, {trained.pre.imgsz}), output 'logits' (batch, {trained.num_classes})"
            + (f", a sigmoid per label (threshold {trained.threshold:g})" if trained.multilabel else "")
        )
        verdict = "ok" if diff <= ONNX_GOAL else f"ABOVE the {ONNX_GOAL:g} goal"
        print(
            f"onnxruntime check on {len(images)} {source} (batches of {len(images)} and 1): "
            f"max |logit diff| {diff:.2e} vs PyTorch ({verdict}), top-1 agrees on {agree}/{len(images)}"
        )
    else:
        with disk_errors(out, KEPT), atomic_dir(out) as build:
            diff = export_hf(model, trained, build)
        print(
            f"timm hub folder {out} (config.json, model.safetensors); loads with "
            f"timm.create_model('local-dir:{out}', pretrained=True): max |logit diff| {diff:.2e}"
        )
        if push_to_hub:
            url = _push(model, trained, push_to_hub)
            print(f"pushed to {url}; load with timm.create_model('hf-hub:{push_to_hub}', pretrained=True)")
    return out


def export_onnx(model: torch.nn.Module, trained: TrainedWeights, out: Path) -> None:
    """torch.onnx's default (torch.export-based) exporter, batch axis dynamic, classes and preprocessing in the
    model's metadata_props."""
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript; say so before it fails deep inside)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"--format onnx needs onnx and onnxscript ({INSTALL_HINT})") from e
    pre = trained.pre
    example = torch.zeros(2, pre.in_chans, pre.imgsz, pre.imgsz)  # 2, not 1: torch.export specialises size-1 dims
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        # One self-contained file unless the weights pass protobuf's 2 GB limit.
        external_data=params_bytes > 1.8e9,
        verbose=False,
    )
    program.model.metadata_props.update(_onnx_metadata(trained))
    program.save(str(out))


def _move_files(build: Path, folder: Path) -> None:
    """Rename the checked export into place: the .onnx file, and its external-data file when it has one."""
    for file in sorted(build.iterdir(), key=lambda p: p.suffix == ".onnx"):  # the model last: its data is ready
        os.replace(file, folder / file.name)


def _onnx_metadata(trained: TrainedWeights) -> dict[str, str]:
    keys = ("model_name", "class_names", "imgsz", "in_chans", "mean", "std", "interpolation", "crop_pct", "epoch")
    keys += ("task", "output", "threshold")  # multi-label weights: a sigmoid per label, and the threshold
    meta = {k: trained.metadata[k] for k in keys if k in trained.metadata}
    if trained.pre.imgsz != trained.train_imgsz:  # --test-imgsz: the graph takes the test size; training's kept too
        meta["imgsz"], meta["train_imgsz"] = str(trained.pre.imgsz), str(trained.train_imgsz)
    return meta


def check_inputs(trained: TrainedWeights, data_name: str | None, count: int) -> tuple[torch.Tensor, str]:
    """Up to `count` validation images of the run's data, preprocessed as in validation; random inputs when the
    data is unknown (no run config.yaml beside the weights and no --data)."""
    cfg = data_config_for(trained, data_name)
    pre = trained.pre
    if cfg is None:
        print("no config.yaml of the run beside the weights and no --data: checking on random inputs")
        generator = torch.Generator().manual_seed(0)
        return torch.randn(count, pre.in_chans, pre.imgsz, pre.imgsz, generator=generator), "random inputs"
    splits, info = data.load_splits(cfg)
    check_classes(trained, info.class_names, cfg.data)
    val = splits["val"].select(range(min(count, len(splits["val"]))))
    spec = data.LoaderSpec(data.Backend("torch", "export's check"), pre, workers=0)
    images = next(iter(data.eval_loader(None, val, spec, len(val)))).images
    return images, f"validation images of {info.source}"


def check_onnx(model: torch.nn.Module, path: Path, images: torch.Tensor) -> tuple[float, int]:
    """Max |logit difference| between onnxruntime and PyTorch (fp32, CPU) over `images`, run as one batch and
    one image alone (the batch axis must really be dynamic); and how many top-1 classes agree."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UserError(f"the ONNX check needs onnxruntime ({INSTALL_HINT})") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(images).numpy()
    batch = session.run(["logits"], {"images": images.numpy()})[0]
    single = session.run(["logits"], {"images": images[:1].numpy()})[0]
    diff = max(np.abs(batch - expected).max(), np.abs(single - expected[:1]).max())
    return float(diff), int((batch.argmax(1) == expected.argmax(1)).sum())


def hf_model_config(trained: TrainedWeights) -> tuple[dict, dict]:
    """(model_config, data_config) for timm's save_for_hf: label names and the training-time preprocessing."""
    pre = trained.pre
    data_config = {
        "input_size": (pre.in_chans, pre.imgsz, pre.imgsz),
        "interpolation": pre.interpolation,
        "mean": pre.mean,
        "std": pre.std,
        "crop_pct": pre.crop_pct,
        "crop_mode": "center",
    }
    return {"label_names": trained.class_names}, data_config


def _clean_pretrained_cfg(model: torch.nn.Module, trained: TrainedWeights) -> None:
    # The model still carries timm's config of its ImageNet weights (tag, hub id, licence): not these weights.
    keep = ("architecture", "first_conv", "classifier", "fixed_input_size")
    pre = trained.pre
    model.pretrained_cfg = {
        **{k: v for k, v in model.pretrained_cfg.items() if k in keep},
        "input_size": (pre.in_chans, pre.imgsz, pre.imgsz),
    }


def export_hf(model: torch.nn.Module, trained: TrainedWeights, out: Path) -> float:
    """timm's hub layout (config.json + model.safetensors) in `out`; reloads it with timm and returns the max
    |logit difference| (0 when every tensor came back)."""
    import timm
    from timm.models import save_for_hf

    _clean_pretrained_cfg(model, trained)
    model_config, data_config = hf_model_config(trained)
    save_for_hf(model, str(out), model_config=model_config, data_config=data_config, safe_serialization=True)
    match_umask(out)
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    pre = trained.pre
    x = torch.randn(2, pre.in_chans, pre.imgsz, pre.imgsz, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((reloaded(x) - model(x)).abs().max())


def _check_hub_credentials() -> None:
    from huggingface_hub import get_token

    if not get_token():
        raise UserError("--push-to-hub needs Hugging Face credentials: run `hf auth login` or set HF_TOKEN")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        raise UserError("--push-to-hub needs the network but HF_HUB_OFFLINE is set; unset it")


def _push(model: torch.nn.Module, trained: TrainedWeights, repo_id: str) -> str:
    from timm.models import push_to_hf_hub

    model_config, data_config = hf_model_config(trained)
    try:
        push_to_hf_hub(model, repo_id, model_config=model_config, data_config=data_config, safe_serialization=True)
    except Exception as e:  # hub errors (auth, network, permissions) come in many types; one line each
        raise UserError(f"--push-to-hub {repo_id}: {type(e).__name__}: {e}".split("\n")[0]) from e
    return f"https://huggingface.co/{repo_id}"
