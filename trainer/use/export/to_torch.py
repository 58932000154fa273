"""Formats made from a traced model: TorchScript (`best.torchscript`) and CoreML (`best.mlpackage`).

TorchScript is deprecated in PyTorch 2.x (torch.jit.* warn FutureWarning) but still what C++ (libtorch), older
serving stacks and coremltools load; the warnings are silenced here, the format works. CoreML converts on Linux;
running it needs macOS (coremltools' runtime is macOS-only), so on Linux it is converted, not verified.
"""

from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path

import torch

from trainer.config import UserError
from trainer.use.export.artifacts import TORCHSCRIPT_EXTRA, need

COREML_MAX_BATCH = 256  # the batch axis is a range 1..this


def trace(model: torch.nn.Module, in_chans: int, imgsz: int) -> torch.jit.ScriptModule:
    """torch.jit.trace at batch 2 (the traced graph takes any batch size)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(model, torch.zeros(2, in_chans, imgsz, imgsz))


def export_torchscript(model: torch.nn.Module, in_chans: int, imgsz: int, meta: dict[str, str], out: Path) -> None:
    """A traced TorchScript file with `meta` as the extra file trainer.json."""
    traced = trace(model, in_chans, imgsz)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, str(out), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(meta)})


def load_torchscript(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def export_coreml(model: torch.nn.Module, in_chans: int, imgsz: int, meta: dict[str, str], out: Path) -> None:
    """An ML program (fp32 compute) with input `images` (1..256, C, H, W), output `logits`; `meta` as user metadata.
    The input is the preprocessed tensor, as for every other format (no ImageType: the normalisation stays ours)."""
    ct = need("coremltools", "coreml", "--format coreml")
    traced = trace(model, in_chans, imgsz)
    shape = ct.Shape(shape=(ct.RangeDim(1, COREML_MAX_BATCH, default=1), in_chans, imgsz, imgsz))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch version not tested", scikit-learn version notices
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name="images", shape=shape)],
            outputs=[ct.TensorType(name="logits")],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT32,
        )
    mlmodel.user_defined_metadata.update(meta)
    mlmodel.short_description = f"{meta['model_name']} image classifier exported by trainer"
    mlmodel.save(str(out))


def coreml_runs_here() -> bool:
    return platform.system() == "Darwin"


class CoreMLModel(torch.nn.Module):
    """A CoreML package run by coremltools (macOS only)."""

    def __init__(self, path: Path):
        super().__init__()
        if not coreml_runs_here():
            raise UserError(
                f"--weights {path}: CoreML models run only on macOS (coremltools' runtime); it was converted here, "
                "run it on a Mac"
            )
        ct = need("coremltools", "coreml", "running a CoreML model")
        self.mlmodel = ct.models.MLModel(str(path))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.mlmodel.predict({"images": images.detach().cpu().float().numpy()})["logits"]
        return torch.as_tensor(out, dtype=torch.float32).to(images.device)
