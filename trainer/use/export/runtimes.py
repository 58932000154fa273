"""Any exported model as a module `trainer val`, `predict` and `benchmark` call like the PyTorch one: preprocessed
images (N, C, H, W) in, float32 logits out on the images' device, run by the format's own runtime.

- onnx: onnxruntime (CUDA provider when it has one and a GPU is there, else the CPU provider);
- openvino: the OpenVINO CPU plugin, compiled with the precision hint recorded at export (never the default);
- torchscript: torch.jit.load; engine: TensorRT on the GPU; coreml: coremltools (macOS only).
A module here holds no parameters: it runs in one process (accelerate launch / torchrun are for .safetensors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from trainer.config import UserError
from trainer.use.export.artifacts import need, openvino_xml


class RuntimeModel(torch.nn.Module):
    """Base: numpy in, numpy out through `self.run`, wrapped as torch tensors on the caller's device."""

    input_dtype = np.float32
    description = ""

    def run(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).numpy().astype(self.input_dtype, copy=False)
        logits = torch.from_numpy(np.asarray(self.run(x), dtype=np.float32))
        return logits.to(images.device)


class OnnxModel(RuntimeModel):
    def __init__(self, path: Path, threads: int = 0):
        super().__init__()
        ort = need("onnxruntime", "export", "running an ONNX model")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per core)
        # Idle threads sleep instead of spinning: a spinning pool takes the CPU the data loader (or, in trainer
        # benchmark, the next runtime) needs between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = ["CUDAExecutionProvider"] if torch.cuda.is_available() else []
        providers = [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types for a damaged file
            raise UserError(f"--weights {path}: onnxruntime cannot load it ({e})".split("\n")[0]) from e
        self.input_dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        self.description = f"onnxruntime {ort.__version__} ({self.session.get_providers()[0]})"

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"images": images})[0]


class OpenVinoModel(RuntimeModel):
    def __init__(self, path: Path, hint: str, threads: int = 0):
        super().__init__()
        from trainer.use.export.to_openvino import compile_openvino

        self.compiled, self.hint = compile_openvino(openvino_xml(path), hint, threads)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.description = f"OpenVINO CPU, INFERENCE_PRECISION_HINT {self.hint}"

    def run(self, images: np.ndarray) -> np.ndarray:
        # The request reuses its output buffer: copy before the next call overwrites it.
        return self.request.infer({0: images}, share_inputs=True)[self.output].copy()


def load_runtime(path: Path, metadata: dict[str, str]) -> torch.nn.Module:
    """The exported model at `path` (format in `metadata`, as artifacts.read_artifact_metadata gives it); `threads`
    in `metadata` (trainer benchmark) sets onnxruntime's and OpenVINO's thread count, else each runtime picks."""
    kind = metadata["export_format"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            f"--weights {path}: an exported model runs in one process; start the command without accelerate launch "
            "or torchrun (or pass the .safetensors weights)"
        )
    threads = int(metadata.get("threads", 0))
    if kind == "onnx":
        return OnnxModel(path, threads).eval()
    if kind == "openvino":
        return OpenVinoModel(path, metadata.get("inference_precision", "f32"), threads).eval()
    if kind == "torchscript":
        from trainer.use.export.to_torch import load_torchscript

        try:
            return load_torchscript(path)
        except RuntimeError as e:
            raise UserError(f"--weights {path}: torch.jit cannot load it ({e})".split("\n")[0]) from e
    if kind == "engine":
        from trainer.use.export.to_tensorrt import TensorRTModel

        return TensorRTModel(path, len(json.loads(metadata["class_names"]))).eval()
    if kind == "coreml":
        from trainer.use.export.to_torch import CoreMLModel

        return CoreMLModel(path).eval()
    raise UserError(f"--weights {path}: unknown export format {kind!r}")


def describe_runtime(model: torch.nn.Module) -> str:
    """What ran it: `OpenVINO CPU, INFERENCE_PRECISION_HINT f32`, `onnxruntime 1.23 (CPUExecutionProvider)`, ..."""
    if isinstance(model, RuntimeModel):
        return model.description
    return type(model).__name__.replace("RecursiveScriptModule", "TorchScript (torch.jit)")
