"""What runs a trained model: a weights file back into a model and its preprocessing, then the commands that use it.

    inference (weights -> model + preprocessing) -> val | predict | export

- `inference`: read a weights file (metadata or its run's config.yaml), rebuild the model and its preprocessing;
- `val`: `trainer val`, the training loop's own `evaluate` on any split, at any process count;
- `predict`: `trainer predict`, top-k (or every label above its threshold) for files, folders and globs;
- `export`: `trainer export`, ONNX (checked against onnxruntime) or a timm hub folder;
- `tta`: test-time augmentation for `val` and `predict`.
"""
