"""OpenVINO IR (model.xml + model.bin in a folder): fp32, bf16, fp16-compressed weights, or int8 by NNCF.

The precision a CPU runs is OpenVINO's INFERENCE_PRECISION_HINT, and its default is bf16 on CPUs with AVX-512 BF16
or AMX: an "FP32" file would silently run in bf16 there. So every export records the hint it was validated with
(`inference_precision` in its metadata) and every load compiles with that hint, never the default:
- fp32: fp32 weights, hint f32;  bf16: fp32 weights, hint bf16 (where the CPU has no bf16, OpenVINO runs f32);
- fp16 (`--half`): weights stored in fp16 (half the file), hint f32;  int8: NNCF post-training quantization
  (`nncf.quantize`, calibrated on training images through the eval preprocessing), hint f32 elsewhere.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from trainer.config import UserError
from trainer.use.export.artifacts import OPENVINO_XML, need

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f32", "int8": "f32"}  # precision -> INFERENCE_PRECISION_HINT


def export_openvino(
    model: torch.nn.Module,
    in_chans: int,
    imgsz: int,
    meta: dict[str, str],
    folder: Path,
    precision: str = "fp32",
    calibration: torch.Tensor | None = None,
) -> None:
    """`folder`/model.xml from the PyTorch model (openvino.convert_model), batch axis dynamic, input `images`,
    output `logits`; `meta` (with the precision hint) in rt_info ["trainer", "metadata"]."""
    ov = need("openvino", "export", "--format openvino")
    example = torch.zeros(1, in_chans, imgsz, imgsz)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # convert_model traces with torch.jit, which warns
        try:
            shape = ov.PartialShape([-1, in_chans, imgsz, imgsz])
            ov_model = ov.convert_model(model, example_input=example, input=[shape])
        except Exception as e:  # OpConversionFailure and friends: say which operations, in one line
            lines = str(e).splitlines() or [type(e).__name__]
            detail = next((line for line in lines if "Conversion is failed for" in line), lines[0])
            raise UserError(
                f"OpenVINO cannot convert {meta['model_name']} at {imgsz} px ({detail.strip('- ')}); a larger "
                "--imgsz or --format onnx may work"
            ) from e
    ov_model.inputs[0].get_tensor().set_names({"images"})
    ov_model.outputs[0].get_tensor().set_names({"logits"})
    if precision == "int8":
        ov_model = quantize_openvino(ov_model, calibration)
    meta = {**meta, "inference_precision": HINTS[precision]}
    ov_model.set_rt_info(json.dumps(meta), ["trainer", "metadata"])
    folder.mkdir(parents=True, exist_ok=True)
    # save_model compresses to fp16 unless told not to: only --half asks for it.
    ov.save_model(ov_model, str(folder / OPENVINO_XML), compress_to_fp16=precision == "fp16")


def quantize_openvino(ov_model, images: torch.Tensor):
    """NNCF post-training int8 quantization, one calibration image per item (so subset_size counts images)."""
    nncf = need("nncf", "export", "--format openvino --int8")
    items = [image[None].numpy() for image in images]
    return nncf.quantize(ov_model, nncf.Dataset(items), subset_size=len(items))


def compile_openvino(xml: Path, hint: str, threads: int = 0):
    """The model compiled for the CPU with an explicit precision hint (and `threads`, 0: OpenVINO's choice); and the
    hint that the CPU plugin reports it runs."""
    ov = need("openvino", "export", "running an OpenVINO model")
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": hint, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
    ran = compiled.get_property("INFERENCE_PRECISION_HINT")
    return compiled, ran.to_string() if hasattr(ran, "to_string") else str(ran)
