"""Reporter with a real single-process Accelerator: run folder files, offline wandb run ids, failures, progress."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator

from trainer.config import RunConfig
from trainer.report import progress as progress_module
from trainer.report.evaluation import Predictions
from trainer.report.reporter import RESULTS_COLUMNS, Reporter
from trainer.report.trackers import WANDB_ID_FILE

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

NAMES = ["a", "b", "c"]
METRICS = {"train/loss": 1.0, "val/loss": 0.9, "val/top1": 0.5, "val/top5": 1.0, "lr": 0.01}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No credentials and no WANDB_ settings, as on a fresh machine: the Reporter goes offline by itself."""
    import os

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _one_epoch(reporter: Reporter, epoch: int) -> None:
    reporter.epoch_start(epoch, 2, batches=4)
    for step in range(1, 5):
        reporter.advance(8)
        reporter.log_train(step + 4 * (epoch - 1), loss=1.0 / step, lr=0.01)
    labels = np.array([0, 1, 2, 2])
    preds = Predictions(labels=labels, topk=np.array([[0, 1], [2, 1], [2, 0], [2, 1]]), loss=np.ones(4, np.float32))
    reporter.log({**METRICS, "epoch": epoch}, step=4 * epoch)
    reporter.epoch_end(epoch, 2, METRICS, seconds=2.0, imgs_per_sec=16.0, best=epoch == 1, preds=preds)


def _offline_run_dirs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _of_run(session: Path, run_id: str) -> bool:
    """An offline session folder of run `run_id`: wandb names it offline-run-<time>-<id>, adding -1, -2, ... when
    another session of the run started within the same second."""
    return re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", session.name) is not None


def test_resume_continues_the_stored_wandb_run_and_keeps_results(tmp_path, wandb_env, capsys):
    run_dir = tmp_path / "exp"
    (run_dir / "weights").mkdir(parents=True)
    record = {"run": {"project": "runs/train"}, "dataset": {"class_names": NAMES}}
    reporter = Reporter(Accelerator(cpu=True))
    reporter.start(run_dir, record, RunConfig(tags="x,y"))
    _one_epoch(reporter, 1)
    run_id = reporter._tracker("wandb").run.id
    reporter.finish({"best/val_top1": 0.5, "best/epoch": 1, "time_s": 3.0, "run_dir": str(run_dir)})
    out = capsys.readouterr().out
    assert "wandb sync" in out and "per-class accuracy at the best epoch (1)" in out
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    assert [p.name.endswith(run_id) for p in _offline_run_dirs(run_dir)] == [True]
    with open(run_dir / "per_class.csv") as f:
        assert sum(int(r["images"]) for r in csv.DictReader(f) if r["class"] != "all") == 4

    # A second session on the same folder (what --resume does) continues the same wandb run.
    resumed = Reporter(Accelerator(cpu=True))
    resumed.start(run_dir, record, RunConfig(), resume=True)
    assert resumed._tracker("wandb").run.id == run_id
    _one_epoch(resumed, 2)
    resumed.finish({"best/val_top1": 0.5, "best/epoch": 1, "time_s": 3.0, "run_dir": str(run_dir)})
    # The best epoch ran before the resume: the reports come from the latest epoch, and say so.
    assert "per-class accuracy at epoch 2 (the best ran before the resume)" in capsys.readouterr().out
    runs = _offline_run_dirs(run_dir)
    assert len(runs) == 2 and all(_of_run(p, run_id) for p in runs)
    with open(run_dir / "results.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(RESULTS_COLUMNS) and [r[0] for r in rows[1:]] == ["1", "2"]

    # Without resume the folder gets a new run id (a fresh run in a reused --exist-ok folder).
    fresh = Reporter(Accelerator(cpu=True))
    fresh.start(run_dir, record, RunConfig())
    assert fresh._tracker("wandb").run.id != run_id
    fresh.finish({"best/val_top1": 0.0, "best/epoch": 0, "time_s": 0.0, "run_dir": str(run_dir)})


def test_explicit_wandb_dir_is_honoured_and_resume_continues_the_run(tmp_path, wandb_env, monkeypatch, capsys):
    """WANDB_DIR (a scratch disk on a cluster) takes wandb's files; the run id stays in the run folder, so
    --resume continues the same wandb run there."""
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("WANDB_DIR", str(scratch))
    run_dir = tmp_path / "exp"
    (run_dir / "weights").mkdir(parents=True)
    record = {"run": {"project": "runs/train"}, "dataset": {"class_names": NAMES}}
    summary = {"best/val_top1": 0.5, "best/epoch": 1, "time_s": 1.0, "run_dir": str(run_dir)}
    for epoch, resume in ((1, False), (2, True)):
        reporter = Reporter(Accelerator(cpu=True))
        reporter.start(run_dir, record, RunConfig(), resume=resume)
        _one_epoch(reporter, epoch)
        reporter.finish(summary)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert f"wandb sync {scratch / 'wandb'}/offline-run-*-{run_id}*" in capsys.readouterr().out
    sessions = sorted((scratch / "wandb").glob("offline-run-*"))
    assert [_of_run(p, run_id) for p in sessions] == [True, True], (run_id, [p.name for p in sessions])
    assert all((p / f"run-{run_id}.wandb").is_file() for p in sessions)
    assert not (run_dir / "wandb").exists()


def test_wandb_failure_warns_and_training_goes_on(tmp_path, wandb_env, monkeypatch, capsys):
    # Online mode with no API key: wandb.init really raises, as it does for a user who forgot to log in.
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    run_dir = tmp_path / "exp"
    run_dir.mkdir()
    reporter = Reporter(Accelerator(cpu=True))
    reporter.start(run_dir, {"dataset": {"class_names": NAMES}}, RunConfig(tracker="wandb,tensorboard"))
    assert "warning: wandb failed" in capsys.readouterr().out
    assert [t.name for t in reporter.accelerator.trackers] == ["tensorboard"]  # the other tracker carries on
    _one_epoch(reporter, 1)
    reporter.finish({"best/val_top1": 0.5, "best/epoch": 1, "time_s": 1.0, "run_dir": str(run_dir)})
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert (run_dir / "confusion_matrix.png").is_file()


def test_failing_tracker_log_is_dropped_not_raised(tmp_path, capsys):
    class Broken:
        name = "wandb"

        def log(self, values, step=None):
            raise ConnectionError("quota exceeded")

    reporter = Reporter(Accelerator(cpu=True))
    reporter.accelerator.trackers.append(Broken())
    reporter.log({"val/top1": 0.5}, step=1)
    reporter.log({"val/top1": 0.6}, step=2)
    assert reporter.accelerator.trackers == []
    assert capsys.readouterr().out.count("warning: wandb failed (ConnectionError: quota exceeded)") == 1


def test_progress_without_terminal_prints_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "PLAIN_PROGRESS_SECONDS", 0.0)
    progress = progress_module.Progress(total=4, desc="epoch 1/2")
    progress.set_postfix(loss="0.5000")
    for _ in range(4):
        progress.update()
    progress.close()
    out = capsys.readouterr().out
    assert "\r" not in out
    assert out.splitlines()[-1].split()[:4] == ["epoch", "1/2", "4/4", "loss"]
