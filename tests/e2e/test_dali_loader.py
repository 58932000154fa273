"""`--loader dali` on the CPU (DALI's CPU operators), as users run it: killed and resumed bitwise, 2 gloo ranks with
disjoint shards and one wandb run, and a generated JPEG folder (with a file DALI rejects) trained to the torch
loader's accuracy."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CPU_2PROC, accelerate_launch, check, config_of, results, run, trainer
from PIL import Image, ImageDraw
from test_resume import ARGS, assert_same_weights, kill_when, start, steps

pytest.importorskip("nvidia.dali")


def test_dali_kill_and_resume_is_bitwise_exact(workdir: Path):
    runs = workdir / "runs" / "train"
    args = (*ARGS, "--epochs", "1", "--loader", "dali")  # killed at step 10 of 25
    check(run(trainer("train", *args, "--name", "ref"), workdir))
    assert config_of(runs / "ref")["launch"]["loader"] == "dali"
    cut = runs / "cut"
    kill_when(start(trainer("train", *args, "--name", "cut"), workdir), lambda: 10 in steps(cut))
    check(run(trainer("train", "--resume", str(cut)), workdir))
    assert_same_weights(runs / "ref", cut)
    assert (cut / "results.csv").read_text() == (runs / "ref" / "results.csv").read_text()


def test_dali_two_ranks_disjoint_shards_one_wandb_run(workdir: Path):
    out = check(run(_shards_cmd(), workdir)).stdout
    shards = [json.loads(line.removeprefix("SHARD ")) for line in out.splitlines() if line.startswith("SHARD ")]
    assert sorted(s["rank"] for s in shards) == [0, 1] and {s["world"] for s in shards} == {2}
    assert shards[0]["steps"] == shards[1]["steps"] == 1617 // 64
    assert not set(shards[0]["indices"]) & set(shards[1]["indices"])
    assert all(s["labels_match"] for s in shards)

    fast = ("--data", "digits", "--imgsz", "16", "--epochs", "1", "--batch-size", "64", "--model", "test_resnet")
    check(run(accelerate_launch(CPU_2PROC, "train", *fast, "--loader", "dali"), workdir))
    run_dir = workdir / "runs" / "train" / "exp"
    cfg = config_of(run_dir)
    assert cfg["launch"]["num_processes"] == 2 and cfg["launch"]["loader"] == "dali"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


def _shards_cmd() -> list[str]:
    script = str(Path(__file__).with_name("dali_shards.py"))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]


def _shapes(root: Path, per_class: int = 48) -> Path:
    """Photo-like JPEGs of four classes (a red disc, a green square, a blue bar, a yellow triangle) on noisy
    backgrounds, at random places and sizes; train/ and val/."""
    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 210, 40)]
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for k, colour in enumerate(colours):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                img = Image.fromarray(rng.integers(60, 190, (48, 64, 3), dtype=np.uint8))
                x, y, r = int(rng.integers(14, 50)), int(rng.integers(14, 34)), int(rng.integers(7, 13))
                draw = ImageDraw.Draw(img)
                if k == 0:
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
                elif k == 1:
                    draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
                elif k == 2:
                    draw.rectangle((x - r, y - 3, x + r, y + 3), fill=colour)
                else:
                    draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
                img.save(folder / f"{i}.jpg", quality=85)
    return root


def test_dali_reaches_the_torch_loaders_accuracy_on_a_jpeg_folder(workdir: Path):
    """With a JPEG in train/ that passes the up-front check but fails inside DALI: the run completes, the file is
    reported once, and top-1 lands within 2 points of the torch loader's."""
    root = _shapes(workdir / "shapes")
    good = (root / "train" / "class0" / "0.jpg").read_bytes()
    (root / "train" / "class0" / "broken.jpg").write_bytes(good[:600] + bytes(range(256)) * 8 + b"\xff\xd9")
    args = ("--data", str(root), "--imgsz", "32", "--epochs", "6", "--batch-size", "32", "--model", "test_resnet")
    args += ("--tracker", "none", "--lr", "0.005", "--seed", "1")
    top1 = {}
    for loader in ("torch", "dali"):
        proc = check(run(trainer("train", *args, "--loader", loader, "--name", loader), workdir))
        run_dir = workdir / "runs" / "train" / loader
        assert config_of(run_dir)["launch"]["loader"] == loader
        top1[loader] = float(results(run_dir)[-1]["val/top1"])
        if loader == "dali":
            assert (proc.stdout + proc.stderr).count("skipped unreadable image") == 1
    assert top1["torch"] >= 0.9, top1
    assert top1["dali"] >= top1["torch"] - 0.02, top1
    # `trainer val --loader dali` repeats the run's own last evaluation (the unit tests hold DALI's eval pixels to
    # the torch path's).
    weights = str(workdir / "runs" / "train" / "dali" / "weights" / "best.safetensors")
    last = str(workdir / "runs" / "train" / "dali" / "weights" / "last.safetensors")
    check(run(trainer("val", "--weights", last, "--loader", "dali"), workdir))
    metrics = json.loads((workdir / "runs" / "val" / "exp" / "metrics.json").read_text())
    assert metrics["loader"] == "dali"
    assert metrics["val/top1"] == pytest.approx(float(results(workdir / "runs" / "train" / "dali")[-1]["val/top1"]))
    # `trainer predict` through either loader: the same classes, EXIF orientation applied, unreadable files listed.
    photos = workdir / "photos"
    photos.mkdir()
    for path in sorted((root / "val" / "class2").glob("*.jpg"))[:8]:
        (photos / path.name).write_bytes(path.read_bytes())
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright
    Image.open(photos / "0.jpg").save(photos / "sideways.jpg", exif=exif.tobytes(), quality=90)
    (photos / "broken.jpg").write_bytes((root / "train" / "class0" / "broken.jpg").read_bytes())
    rows = {}
    for loader in ("torch", "dali"):
        check(run(trainer("predict", "--weights", weights, str(photos), "--loader", loader, "--name", loader), workdir))
        with open(workdir / "runs" / "predict" / loader / "predictions.csv") as f:
            rows[loader] = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert rows["torch"].keys() == rows["dali"].keys() and len(rows["dali"]) == 10
    for name, row in rows["dali"].items():
        assert row["top1"] == rows["torch"][name]["top1"] and bool(row["error"]) == (name == "broken.jpg")
        if row["prob1"]:
            assert float(row["prob1"]) == pytest.approx(float(rows["torch"][name]["prob1"]), abs=0.02)
