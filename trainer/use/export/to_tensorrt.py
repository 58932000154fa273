"""TensorRT (`best.engine`): an engine built from the ONNX graph for this machine's NVIDIA GPU (fp16 with --half).

An engine is a plan for one GPU model and TensorRT version, so it is built where it will run; it has no metadata
field, so its description goes in a sidecar `best.engine.json`. GPU only: refused in one line on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import UserError
from trainer.use.export.artifacts import need

MAX_BATCH = 64  # the optimisation profile's batch range: 1..MAX_BATCH, tuned for MAX_BATCH // 2
WORKSPACE_BYTES = 4 << 30


def refuse_without_gpu() -> None:
    if not torch.cuda.is_available():
        raise UserError(
            "--format engine builds a TensorRT engine for this machine's NVIDIA GPU and there is none here; "
            "on a CPU use --format onnx or --format openvino"
        )


def build_engine(onnx_path: Path, in_chans: int, imgsz: int, out: Path, half: bool) -> None:
    """Parse the ONNX file, build a serialized engine (dynamic batch 1..MAX_BATCH, fp16 when `half`) into `out`."""
    refuse_without_gpu()
    trt = need("tensorrt", "tensorrt", "--format engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse the ONNX graph: {errors}".split("\n")[0])
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if half:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = (in_chans, imgsz, imgsz)
    profile.set_shape("images", (1, *shape), (MAX_BATCH // 2, *shape), (MAX_BATCH, *shape))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT could not build an engine from the ONNX graph (see its log above)")
    out.write_bytes(bytes(plan))


class TensorRTModel(torch.nn.Module):
    """A TensorRT engine run on the current CUDA stream: fp32 images in, fp32 logits out (on the GPU)."""

    def __init__(self, path: Path, num_classes: int):
        super().__init__()
        refuse_without_gpu()
        trt = need("tensorrt", "tensorrt", "running a TensorRT engine")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"--weights {path}: not an engine this TensorRT version and GPU can run; export it again")
        self.context = self.engine.create_execution_context()
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chunk in images.split(MAX_BATCH):
            x = chunk.to("cuda", torch.float32).contiguous()
            out = torch.empty(len(x), self.num_classes, device="cuda", dtype=torch.float32)
            self.context.set_input_shape("images", tuple(x.shape))
            self.context.set_tensor_address("images", x.data_ptr())
            self.context.set_tensor_address("logits", out.data_ptr())
            self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
            outputs.append(out)
        return torch.cat(outputs).to(images.device)
