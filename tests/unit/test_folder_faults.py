"""The folder scan meets a hostile file system (issue 19): an unreadable class folder, a link loop, a file name that
is not UTF-8. Each is one line naming the place, or a file skipped and counted; nothing is left half-built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from test_sources import write_folder

from trainer.config import UserError
from trainer.data.sources import classfolder

LAYOUT = {"train": {"cat": 4, "dog": 4}, "val": {"cat": 2, "dog": 2}}
NO_DAC = ["--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_a_file_name_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "pets", LAYOUT)
    odd = os.fsdecode(bytes(root / "train" / "cat") + b"/caf\xe9.png")
    shutil.copy(next((root / "train" / "cat").iterdir()), odd)
    for _ in range(2):  # the first scan, then the cached one: the same answer
        result = classfolder.scan_image_folder(root, str(root))
        assert len(result.splits["train"]) == 8
        assert result.skipped == ((str(root / "train" / "cat" / "caf\\xe9.png"), classfolder.BAD_NAME_RESULT[1]),)


def test_images_over_the_pixel_limit_are_skipped_and_counted_at_the_scan(tmp_path, monkeypatch):
    """A decompression bomb never reaches a worker: the scan reads its header's size and skips it with the reason,
    for JPEG and PNG (the header fast path), other formats (PIL's header), and sizes over twice the limit (where PIL
    itself raises)."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)
    root = write_folder(tmp_path / "pets", LAYOUT)
    large = {"big.jpg": (50, 40), "big.png": (41, 40), "big.bmp": (40, 41), "huge.png": (100, 100)}
    for name, size in large.items():
        Image.new("RGB", size).save(root / "train" / "dog" / name)
    Image.new("RGB", (40, 40)).save(root / "train" / "dog" / "limit.png")  # at the limit: kept
    for _ in range(2):  # the first scan, then the cached one: the same answer
        result = classfolder.scan_image_folder(root, str(root))
        assert len(result.splits["train"]) == 9
        reasons = {os.path.basename(path): why for path, why in result.skipped}
        assert sorted(reasons) == sorted(large)
        for name in ("big.jpg", "big.png", "big.bmp"):
            w, h = large[name]
            assert reasons[name] == f"{w}x{h} pixels, above the limit of 1600 (PIL's Image.MAX_IMAGE_PIXELS)"
        assert reasons["huge.png"].startswith("DecompressionBombError: Image size (10000 pixels) exceeds limit")


def test_a_link_back_up_is_refused_in_one_line(tmp_path):
    root = write_folder(tmp_path / "pets", LAYOUT)
    (root / "train" / "dog" / "again").symlink_to("..")
    with pytest.raises(UserError, match=r"train/dog/again links to .*pets/train, a folder it is in \(a loop\)"):
        classfolder.scan_image_folder(root, str(root))
    (root / "train" / "dog" / "again").unlink()
    (root / "train" / "dog" / "more").symlink_to(root / "val" / "dog")  # a link elsewhere is followed
    assert len(classfolder.scan_image_folder(root, str(root)).splits["train"]) == 10


def test_an_unreadable_class_folder_is_one_line_naming_it(tmp_path):
    """As a user without root: the test runs the scan with the capabilities that let root read anything dropped."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed: cannot drop root's read-anything capability")
    root = write_folder(tmp_path / "pets", LAYOUT)
    (root / "train" / "dog").chmod(0)
    code = "import sys; from pathlib import Path; from trainer.data.sources import classfolder; "
    code += "classfolder.scan_image_folder(Path(sys.argv[1]), sys.argv[1])"
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    try:
        proc = subprocess.run(["setpriv", *NO_DAC, sys.executable, "-c", code, str(root)], capture_output=True, env=env)
    finally:
        (root / "train" / "dog").chmod(0o755)
    if b"setpriv:" in proc.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.decode().strip()}")
    last = proc.stderr.decode().strip().splitlines()[-1]
    assert last == (
        f"trainer.config.UserError: --data: cannot read folder {root / 'train' / 'dog'} (permission denied); give it "
        "read and search permission (chmod u+rx) or move it out of the data folder"
    )


def test_val_on_a_deleted_data_folder_says_so_not_allow_download(tmp_path):
    import torch
    import yaml

    from trainer.data import Preprocess
    from trainer.run.weights import save_weights, weights_metadata
    from trainer.use.inference import data_config_for, read_weights

    run_dir = tmp_path / "runs" / "train" / "exp"
    (run_dir / "weights").mkdir(parents=True)
    gone = tmp_path / "pets"  # trained on, then deleted
    record = {"data": {"data": str(gone)}, "dataset": {"source": f"folder:{gone}"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(record))
    pre = Preprocess(16, 3, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
    save_weights(
        {"w": torch.ones(1)}, run_dir / "weights" / "best.safetensors", weights_metadata("resnet10t", ["a", "b"], pre)
    )
    trained = read_weights(str(run_dir / "weights" / "best.safetensors"))
    with pytest.raises(UserError, match=rf"^the run's data {gone} \(folder, from .*\) is not there any more") as e:
        data_config_for(trained, None)
    assert "--allow-download" not in str(e.value) and "pass --data" in str(e.value)
    assert data_config_for(trained, str(tmp_path)).data == str(tmp_path)  # --data given: used as it is


def test_present_counts_index_and_mixed_labels():
    from trainer.data import present

    assert present(torch.tensor([0, 2, 2]), 4).tolist() == [1, 0, 2, 0]
    smooth = 0.1 / 4  # mixup of classes 0 and 2 under label smoothing 0.1: every class gets `smooth`
    mixed = torch.tensor([[0.7 * 0.9 + smooth, smooth, 0.3 * 0.9 + smooth, smooth]] * 3)
    assert present(mixed, 4).tolist() == [3, 0, 3, 0]


def test_a_class_that_lost_every_image_is_one_line_and_a_sampling_miss_is_not(tmp_path):
    from trainer.data import ClassCoverage

    root = write_folder(tmp_path / "pets", LAYOUT)
    scan = classfolder.scan_image_folder(root, str(root))
    coverage = ClassCoverage(scan.splits["train"], scan.class_names)
    assert coverage.counts.tolist() == [4, 4]
    coverage.check([0, 8], epoch=3, run_dir="runs/train/exp")  # cat's images read: an epoch that drew none of them
    for image in (root / "train" / "cat").iterdir():
        image.write_bytes(b"\0" * image.stat().st_size)  # broken in place, after the scan
    with pytest.raises(UserError) as e:
        coverage.check([0, 8], epoch=3, run_dir="runs/train/exp")
    assert str(e.value).startswith(
        "every image of class cat is unreadable now: epoch 3 trained on none of its 4 images, and the first 4 fail "
        f"to read (e.g. {root}/train/cat/"
    )
    assert str(e.value).endswith("then continue with trainer train --resume runs/train/exp")
    coverage.check([4, 4], epoch=3, run_dir="runs/train/exp")  # seen: never read again
