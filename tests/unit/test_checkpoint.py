"""Run-folder naming and the safetensors weights file with its metadata."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from trainer.data import Preprocess
from trainer.run.rundirs import increment_path
from trainer.run.weights import read_metadata, save_weights, weights_metadata


def test_increment_path(tmp_path):
    exp = tmp_path / "exp"
    assert increment_path(exp, exist_ok=False) == exp  # free: used as is
    exp.mkdir()
    assert increment_path(exp, exist_ok=False) == tmp_path / "exp2"
    (tmp_path / "exp2").mkdir()
    assert increment_path(exp, exist_ok=False) == tmp_path / "exp3"
    assert increment_path(exp, exist_ok=True) == exp


def test_increment_path_is_numeric_not_lexical(tmp_path):
    for name in ("exp", "exp2", "exp10", "expert", "exp_old"):
        (tmp_path / name).mkdir()
    assert increment_path(tmp_path / "exp", exist_ok=False) == tmp_path / "exp11"


def test_save_weights_round_trip(tmp_path):
    pre = Preprocess(imgsz=32, in_chans=1, mean=(0.449,), std=(0.226,), interpolation="bicubic", crop_pct=0.875)
    class_names = ["cat", "dog", "ému"]
    meta = weights_metadata("resnet10t", class_names, pre, epoch=3)
    state = {
        "fc.weight": torch.randn(3, 4).t(),  # non-contiguous: safetensors needs it made contiguous
        "bn.num_batches_tracked": torch.tensor(7),
    }
    path = tmp_path / "best.safetensors"
    save_weights(state, path, meta)

    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]  # no temporary file left behind
    loaded = load_file(str(path))  # plain safetensors, no trainer code needed
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value)
        assert loaded[key].dtype == value.dtype

    read = read_metadata(path)
    assert read["model_name"] == "resnet10t"
    assert json.loads(read["class_names"]) == class_names
    assert read["num_classes"] == "3"
    assert int(read["imgsz"]) == 32 and int(read["in_chans"]) == 1
    assert json.loads(read["mean"]) == [0.449] and json.loads(read["std"]) == [0.226]
    assert read["interpolation"] == "bicubic" and float(read["crop_pct"]) == 0.875
    assert read["epoch"] == "3"
