"""`trainer export` and `trainer benchmark`: a trained model in other formats, each verified through its own runtime.

    command (export) -> to_torch | to_onnx | to_openvino | to_tensorrt | hub -> checks (verify on val) -> rename
    runtimes (any export -> a module, logits out) <- val, predict, benchmark

- `artifacts`: names beside the weights (best.onnx, best_int8_openvino/, ...), the metadata every artifact carries,
  reading it back from any format;
- `to_torch`: TorchScript and CoreML (from a trace); `to_onnx`: ONNX fp32/fp16 and int8 (onnxruntime, QDQ);
  `to_openvino`: OpenVINO IR fp32/bf16/fp16 and int8 (NNCF), the precision hint explicit; `to_tensorrt`: engines;
  `hub`: the timm hub folder and its model card;
- `checks`: validation images and PyTorch's logits, the comparison and its bounds, int8 calibration images;
- `runtimes`: load any export into a module for `trainer val` / `predict` (via trainer.use.inference);
- `command`: `trainer export`; `benchmark`: `trainer benchmark` (export, verify, time each format, one table).
"""
