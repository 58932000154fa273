"""A folder converted to WebDataset shards and streamed on 2 gloo ranks: 3 uneven shards, equal steps and no hang,
validation equal to a 1-process evaluation, and resumes (at an epoch end, mid-epoch) that end bit for bit where the
run ended."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import check, config_of, results, run, torchrun, trainer
from PIL import Image
from test_resume import assert_same_weights

# 240 training digits in shards of 100, 100 and 40: accelerate's split of that stream gives 2 ranks 200 and 40 samples.
ARGS = ("--streaming", "--imgsz", "16", "--epochs", "2", "--batch-size", "64", "--model", "test_resnet", "--hflip", "0")
ARGS += ("--tracker", "none", "--workers", "0", "--deterministic", "--checkpoint-every", "2", "--keep-checkpoints", "9")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """300 of scikit-learn's digits as PNGs in train/ (240) and val/ (every 5th, 60), converted to WebDataset shards of
    100 (`trainer data convert` in-process; its command line is tested in tests/unit/test_streaming.py)."""
    from sklearn.datasets import load_digits

    from trainer.data.convert import convert

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    for i in range(300):
        sub = root / "folder" / ("val" if i % 5 == 0 else "train") / f"digit_{digits.target[i]}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8), mode="L").save(sub / f"{i}.png")
    assert convert(str(root / "folder"), str(root / "shards"), "webdataset", "100") == {"train": 240, "val": 60}
    return root / "shards"


def test_streamed_shards_on_two_ranks_validate_once_and_resume_exactly(workdir: Path, shards: Path):
    runs = workdir / "runs" / "train"
    # A rank with fewer batches than the other would leave it waiting in an all-reduce: the timeout catches a hang.
    check(run(torchrun(2, "train", "--data", str(shards), *ARGS, "--name", "ref"), workdir, timeout=300))
    ref = runs / "ref"
    cfg = config_of(ref)
    assert cfg["launch"]["num_processes"] == 2
    assert cfg["launch"]["steps_per_epoch"] == 240 // 64  # on every rank: the run would hang otherwise
    assert (cfg["dataset"]["train_size"], cfg["dataset"]["val_size"]) == (240, 60)
    assert cfg["dataset"]["class_names"][:2] == ["digit_0", "digit_1"]
    rows = results(ref)
    assert len(rows) == 2

    # Validation at 2 ranks (in the run) equals a 1-process evaluation of the same weights, every sample once.
    check(run(trainer("val", "--weights", str(ref / "weights" / "last.safetensors")), workdir))
    metrics = json.loads((workdir / "runs" / "val" / "exp" / "metrics.json").read_text())
    assert metrics["images"] == 60 and metrics["num_processes"] == 1
    assert metrics["val/top1"] == pytest.approx(float(rows[-1]["val/top1"]), abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(float(rows[-1]["val/loss"]), abs=1e-4)

    # Resume from the end of epoch 1 (step 3) and from 1 batch into epoch 2 (step 4): bit for bit the same run.
    for name, step in (("boundary", 3), ("mid", 4)):
        cut = runs / name
        shutil.copytree(ref, cut)
        for later in [p for p in (cut / "checkpoints").iterdir() if int(p.name.split("-")[-1]) > step]:
            shutil.rmtree(later)
        shutil.rmtree(cut / "weights")
        (cut / "weights").mkdir()
        out = check(run(torchrun(2, "train", "--resume", str(cut)), workdir, timeout=300)).stdout
        assert f"resuming {cut} at epoch 2, step {step}" in out
        assert_same_weights(ref, cut)
        assert (cut / "results.csv").read_text() == (ref / "results.csv").read_text()
