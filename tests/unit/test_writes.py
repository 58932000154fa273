"""Outputs written under a temporary name then renamed, disk errors as one line, and the run folder's lock (issue 19).

A write that fails with ENOSPC is simulated by monkeypatching the writer; tests/e2e/test_faults.py fills a real tmpfs.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from trainer.config import RunConfig, UserError
from trainer.report import evaluation
from trainer.report.reporter import Reporter
from trainer.run.faults import error_line, plain
from trainer.run.rundirs import LOCK_FILE, RunFolder, lock_run_dir, make_run_dir, release_run_dir
from trainer.run.weights import save_weights
from trainer.run.writes import atomic_dir, disk_errors, write_error_line

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
METRICS = {"train/loss": 1.0, "val/loss": 0.9, "val/top1": 0.5, "val/top5": 1.0, "lr": 0.01}


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_keeps_the_previous_plot_and_says_where(tmp_path, monkeypatch):
    path = tmp_path / "confusion_matrix.png"
    evaluation.save_confusion_matrix_png(np.eye(3, dtype=np.int64), ["a", "b", "c"], path)
    before = path.read_bytes()
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _no_space)
    with pytest.raises(UserError) as e, disk_errors(tmp_path):
        evaluation.save_confusion_matrix_png(np.eye(3, dtype=np.int64), ["a", "b", "c"], path)
    assert str(e.value) == f"no space left on {tmp_path}; free some space there and run the command again"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png"]  # no temporary file left


def test_results_csv_keeps_every_row_when_the_disk_fills(tmp_path, monkeypatch):
    run_dir = tmp_path / "exp"
    run_dir.mkdir()
    reporter = Reporter(Accelerator(cpu=True))
    reporter.start(run_dir, {"dataset": {"class_names": ["a"]}}, RunConfig(tracker="none"))
    reporter.epoch_end(1, 2, METRICS, seconds=1.0, imgs_per_sec=10.0, best=True)
    before = (run_dir / "results.csv").read_bytes()
    monkeypatch.setattr("shutil.copyfile", _no_space)
    with pytest.raises(
        UserError, match=rf"^no space left on {run_dir / 'results.csv'}; .*rows written before are kept"
    ):
        reporter.epoch_end(2, 2, METRICS, seconds=1.0, imgs_per_sec=10.0, best=False)
    assert (run_dir / "results.csv").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "results.csv"]


def test_a_full_disk_keeps_the_previous_weights(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    save_weights({"w": torch.ones(3)}, path, {"format": "pt"})
    monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: _safetensors_full())
    with pytest.raises(UserError, match=rf"^no space left on {tmp_path}; .*kept$"), disk_errors(tmp_path, "kept"):
        save_weights({"w": torch.zeros(3)}, path, {"format": "pt"})
    assert torch.equal(load_file(str(path))["w"], torch.ones(3))


def _safetensors_full():
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_hf_folder_is_swapped_in_whole_or_not_at_all(tmp_path):
    out = tmp_path / "best_hf"
    with atomic_dir(out) as build:
        (build / "model.safetensors").write_text("first")
    with pytest.raises(OSError), atomic_dir(out) as build:
        (build / "model.safetensors").write_text("half")
        _no_space()
    assert (out / "model.safetensors").read_text() == "first"
    with atomic_dir(out) as build:
        (build / "config.json").write_text("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_hf"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "runs/x/a.png"), "no space left on runs/x/a.png"),
        (OSError(errno.EROFS, "Read-only file system"), "cannot write out: read-only file system"),
        (OSError(errno.EACCES, "Permission denied"), "cannot write out: permission denied"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), "no space left on out"),
        (ValueError("a bug"), None),
        (OSError(errno.ENOENT, "No such file"), None),
    ],
)
def test_write_errors_are_named_by_cause(error, expected):
    line = write_error_line(error, "out")
    assert line == expected if expected is None else line.startswith(expected)


def test_library_wording_for_a_full_disk_is_plain():
    torch_text = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"
    text = f"cannot write checkpoint runs/x/checkpoints ({torch_text})"
    assert plain(text) == "cannot write checkpoint runs/x/checkpoints (no space left on device)"
    assert error_line(KeyError("x")) is None  # not an environment error: the traceback shows the bug


def test_a_locked_run_folder_names_its_holder_and_is_free_after_kill(tmp_path):
    run_dir = tmp_path / "exp"
    run_dir.mkdir()
    code = "import sys, time; from trainer.run.rundirs import lock_run_dir; lock_run_dir(sys.argv[1]); "
    code += "print('held', flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", code + "; time.sleep(60)", str(run_dir)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(UserError, match=rf"^run folder {run_dir} is in use by PID {holder.pid} on host "):
            make_run_dir(RunFolder(str(tmp_path), "exp", exist_ok=True))
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the OS drops the lock
        holder.wait()
    lock_run_dir(run_dir)
    lock_run_dir(run_dir)  # this process holds it already: no-op
    assert (run_dir / LOCK_FILE).read_text().split()[1] == str(os.getpid())
    release_run_dir(run_dir)


def test_a_val_image_lost_after_the_scan_is_reported_not_fatal_at_the_end(tmp_path, capsys):
    from PIL import Image

    from trainer.report.evaluation import Predictions

    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("L", (8, 8), 40 * i).save(paths[-1])
    val_split = [{"image": {"bytes": None, "path": p}} for p in paths]
    os.remove(paths[2])  # gone after the scan, before the report
    run_dir = tmp_path / "exp"
    run_dir.mkdir()
    reporter = Reporter(Accelerator(cpu=True))
    reporter.start(run_dir, {"dataset": {"class_names": ["a", "b"]}}, RunConfig(tracker="none"))
    labels = np.array([0, 1, 0, 1])
    preds = Predictions(labels=labels, topk=np.array([[0, 1], [0, 1], [0, 1], [1, 0]]), loss=np.ones(4, np.float32))
    reporter.epoch_end(1, 1, METRICS, seconds=1.0, imgs_per_sec=4.0, best=True, preds=preds)
    reporter.finish({"best/val_top1": 0.5, "best/epoch": 1, "time_s": 1.0, "run_dir": str(run_dir)}, val_split)
    err = capsys.readouterr().err
    assert f"trainer: warning: skipped unreadable image {paths[2]}" in err
    assert Image.open(run_dir / "val_predictions.png").size[0] > 0  # drawn from the 3 images that read
