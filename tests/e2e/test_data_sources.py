"""Real runs on an image folder: grayscale PNGs train an RGB model, broken files are skipped, 2 ranks agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import check, config_of, results, run, torchrun, torchrun_script, trainer
from PIL import Image
from safetensors import safe_open

FOLDER_RUN = ("--imgsz", "16", "--batch-size", "64", "--tracker", "none", "--hflip", "0")


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """scikit-learn's digits as grayscale PNGs in train/ and val/ (every 5th image), plus 3 unreadable files."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_folder")
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / ("val" if i % 5 == 0 else "train") / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    broken = root / "train" / "digit_3"
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "notes.jpg").write_text("not an image")
    whole = next(broken.glob("*.png")).read_bytes()  # a real PNG, cut short
    (broken / "cut.png").write_bytes(whole[: len(whole) // 2])
    return root


def test_grayscale_folder_trains_rgb_model_and_skips_broken_files(workdir: Path, digit_folder: Path):
    proc = check(
        run(trainer("train", "--data", str(digit_folder), *FOLDER_RUN, "--epochs", "2", "--in-chans", "3"), workdir)
    )
    assert proc.stdout.count("warning: skipped 3 unreadable image file(s)") == 1
    assert "empty.jpg (empty file)" in proc.stdout
    run_dir = workdir / "runs" / "train" / "exp"
    dataset = config_of(run_dir)["dataset"]
    assert dataset["skipped_files"] == 3 and dataset["in_chans"] == 3
    assert dataset["val_split"] == "split val" and dataset["class_names"][0] == "digit_0"
    assert (dataset["train_size"], dataset["val_size"]) == (1437, 360)
    assert max(float(r["val/top1"]) for r in results(run_dir)) >= 0.8
    with safe_open(str(run_dir / "weights" / "best.safetensors"), framework="pt") as f:
        assert f.get_tensor("conv1.0.weight").shape[1] == 3  # an RGB model, fed grey replicated to 3 channels


def test_two_ranks_with_mixup_cutmix_randaugment_on_a_folder(workdir: Path, digit_folder: Path):
    augment = ("--mixup", "0.2", "--cutmix", "1.0", "--auto-augment", "rand-m9-mstd0.5", "--random-erase", "0.25")
    proc = check(
        run(torchrun(2, "train", "--data", str(digit_folder), *FOLDER_RUN, "--epochs", "1", *augment), workdir)
    )
    run_dir = workdir / "runs" / "train" / "exp"
    cfg = config_of(run_dir)
    assert cfg["launch"]["num_processes"] == 2
    assert cfg["data"]["mixup"] == 0.2 and cfg["data"]["auto_augment"] == "rand-m9-mstd0.5"
    assert proc.stdout.count("warning: skipped 3 unreadable") == 1  # the main process warns, once
    assert len(results(run_dir)) == 1


def test_two_ranks_share_one_scan_of_a_folder(workdir: Path):
    """torchrun, 2 ranks: the main process checks every file once, the other rank reuses its scan, and both get
    the same files, labels, held-out validation split and skipped files, from the same cache files."""
    root = workdir / "photos"
    for i in range(60):
        folder = root / f"class_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 4 * i, dtype=np.uint8)).save(folder / f"{i}.jpg")
    (root / "class_1" / "empty.jpg").write_bytes(b"")
    script = str(Path(__file__).with_name("folder_ranks.py"))
    check(
        run(
            torchrun_script(2, script, str(root), str(workdir)),
            workdir,
        )
    )
    main, other = (json.loads((workdir / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["world_size"] == other["world_size"] == 2
    assert (main["opened"], other["opened"]) == (61, 0)
    for key in ("train_files", "train_labels", "val_files", "val_labels", "skipped", "cache_files"):
        assert main[key] == other[key], key
    assert len(main["train_files"]) + len(main["val_files"]) == 60 and len(main["skipped"]) == 1
    assert main["cache_files"][0].startswith(str(workdir / "home"))  # the HF datasets cache of this HOME
