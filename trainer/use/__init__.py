"""What runs a trained model: a weights file back into a model and its preprocessing, then the commands that use it.

    inference (weights or an exported model -> model + preprocessing) -> val | predict | export | benchmark

- `inference`: read a weights file or an exported model (metadata or its run's config.yaml), rebuild the model (or
  load the export into its runtime) and its preprocessing;
- `val`: `trainer val`, the training loop's own `evaluate` on any split, at any process count;
- `predict`: `trainer predict`, top-k (or every label above its threshold) for files, folders and globs;
- `export/`: `trainer export` (TorchScript, ONNX, OpenVINO, int8, TensorRT, CoreML, a timm hub folder), each
  verified on the validation split through its own runtime, and `trainer benchmark` (one table of every format);
- `tta`: test-time augmentation for `val` and `predict`.
"""
