"""ONNX: torch.onnx's exporter (fp32, or fp16 on a GPU), and int8 by onnxruntime's static quantization (QDQ).

The int8 model is calibrated on training images through the run's own evaluation preprocessing (see
trainer.use.export.checks.calibration_images), so the activation ranges are those the model sees in `trainer val`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from trainer.use.export.artifacts import need


def export_onnx(model: torch.nn.Module, in_chans: int, imgsz: int, meta: dict[str, str], out: Path, half=False):
    """Input `images` (batch, C, H, W), output `logits`, batch axis dynamic; `meta` in metadata_props.
    `half`: the graph in fp16 (traced on the GPU, where fp16 runs)."""
    need("onnx", "export", "--format onnx")
    need("onnxscript", "export", "--format onnx")
    device = "cuda" if half else "cpu"
    if half:
        model = copy.deepcopy(model).to(device).half()
    example = torch.zeros(2, in_chans, imgsz, imgsz, device=device)  # 2, not 1: torch.export specialises size 1
    example = example.half() if half else example
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
    program.model.metadata_props.update(meta)
    program.save(str(out))


class _Calibration:
    """onnxruntime's CalibrationDataReader over preprocessed images, in batches of 16."""

    def __init__(self, images: torch.Tensor):
        self.batches = iter(images.split(16))

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch.numpy().astype(np.float32)}


def quantize_onnx(fp32: Path, out: Path, images: torch.Tensor, meta: dict[str, str]) -> None:
    """Static int8 quantization of an fp32 ONNX file: QDQ format, per-channel weights, activation ranges calibrated
    on `images` (N, C, H, W, preprocessed); `meta` in metadata_props."""
    onnx = need("onnx", "export", "--format onnx --int8")
    quant = need("onnxruntime.quantization", "export", "--format onnx --int8")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # folds and infers shapes, as ORT advises
    quant.quantize_static(
        str(prepared),
        str(out),
        _Calibration(images),
        quant_format=quant.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quant.QuantType.QInt8,
        weight_type=quant.QuantType.QInt8,
    )
    prepared.unlink()
    model = onnx.load(str(out))
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in meta.items())
    onnx.save(model, str(out))
