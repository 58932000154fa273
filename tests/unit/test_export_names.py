"""What `trainer export` calls its files, how `--weights` tells a format from a path, and `--formats` labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import UserError
from trainer.use.export.artifacts import Target, artifact_kind


@pytest.mark.parametrize(
    ("target", "name"),
    [
        (Target("torchscript"), "best.torchscript"),
        (Target("onnx"), "best.onnx"),
        (Target("onnx", int8=True), "best_int8.onnx"),
        (Target("openvino"), "best_openvino"),
        (Target("openvino", bf16=True), "best_openvino"),
        (Target("openvino", int8=True), "best_int8_openvino"),
        (Target("engine", half=True), "best.engine"),
        (Target("coreml"), "best.mlpackage"),
        (Target("hf"), "best_hf"),
    ],
)
def test_exports_are_named_beside_the_weights(tmp_path: Path, target: Target, name: str):
    weights = tmp_path / "run" / "weights" / "best.safetensors"
    assert target.path_for(weights) == weights.parent / name
    if target.fmt != "hf":  # the hub folder is no benchmark format
        assert Target.parse(target.label) == target


def test_benchmark_keeps_precisions_of_one_format_apart(tmp_path: Path):
    weights = tmp_path / "best.safetensors"
    names = {
        Target.parse(label).path_for(weights, tmp_path, distinct=True).name
        for label in ("openvino", "openvino-bf16", "openvino-fp16", "openvino-int8")
    }
    assert names == {"best_openvino", "best_bf16_openvino", "best_fp16_openvino", "best_int8_openvino"}


def test_kind_from_path(tmp_path: Path):
    (tmp_path / "best_openvino").mkdir()
    (tmp_path / "best_openvino" / "model.xml").write_text("<net/>")
    (tmp_path / "plain").mkdir()
    assert [artifact_kind(tmp_path / n) for n in ("a.onnx", "a.torchscript", "a.engine", "a.safetensors")] == [
        "onnx",
        "torchscript",
        "engine",
        "safetensors",
    ]
    assert artifact_kind(tmp_path / "best_openvino") == "openvino"
    with pytest.raises(UserError, match="a folder, but not an OpenVINO export"):
        artifact_kind(tmp_path / "plain")


@pytest.mark.parametrize("label", ["tflite", "onnx-bf16x", "hf"])
def test_unknown_benchmark_label_is_refused(label: str):
    with pytest.raises(UserError, match=f"--formats {label}: unknown format; known: torchscript, onnx"):
        Target.parse(label)
