"""Checkpoints: complete or absent, rotated, restored exactly, loaded safely; --resume rules."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator

from trainer.config import CheckpointConfig, Config, UserError
from trainer.run import checkpointer, weights
from trainer.run.checkpointer import Checkpointer, TrainState
from trainer.run.manifest import write_manifest
from trainer.run.resume import LATEST, checkpoint_dirs, find_run_dir, resume_config

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class Payload:
    """Unpickling this runs a shell command that creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Counter:
    """A stateful object registered for checkpointing, as an EMA or a timm scheduler would be."""

    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _setup(run_dir: Path, keep: int = 2):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return (
        accelerator,
        model,
        optimizer,
        scheduler,
        counter,
        Checkpointer(accelerator, run_dir, CheckpointConfig(keep_checkpoints=keep)),
    )


def _train_step(model, optimizer, scheduler):
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_save_rotate_and_restore_exactly(tmp_path):
    _, model, optimizer, scheduler, counter, ckpt = _setup(tmp_path)
    for step in (5, 10, 15):
        _train_step(model, optimizer, scheduler)
        counter.value = step
        ckpt.save(
            TrainState(epoch=1, step=step, batches_in_epoch=3, best_top1=0.5), torch.tensor(1.5), torch.tensor(8.0)
        )
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-10", "step-15"]  # --keep-checkpoints 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-10", "step-15"]  # nothing temporary
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draw = torch.rand(3)  # the RNG stream right after the save

    _train_step(model, optimizer, scheduler)
    counter.value = -1
    torch.rand(5)
    # A save killed half-way leaves a temporary folder; it is never taken for a checkpoint.
    (tmp_path / "checkpoints" / ".tmp-step-20").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-20" / "optimizer.bin").write_bytes(b"torn")
    state = ckpt.restore(epochs=2)

    assert (state.step, state.epoch, state.batches_in_epoch, state.best_top1) == (15, 1, 3, 0.5)
    assert (state.loss_sum, state.seen) == (1.5, 8.0)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert scheduler.scheduler.last_epoch == 3 and counter.value == 15
    assert torch.equal(torch.rand(3), expected_draw)
    with pytest.raises(UserError, match="already finished its 1 epochs"):
        ckpt.restore(epochs=1)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_of_the_umask(tmp_path, umask):
    """Weights and checkpoints (safetensors writes 0600 temporary files) come out as any new file would."""
    previous = os.umask(umask)
    try:
        accelerator, model, _, _, _, checkpointer = _setup(tmp_path)
        saved = checkpointer.save(TrainState(step=1))
        weights.save_weights(accelerator.get_state_dict(model), tmp_path / "best.safetensors", {"epoch": "1"})
    finally:
        os.umask(previous)
    files = [tmp_path / "best.safetensors", *saved.iterdir()]
    assert saved / "model.safetensors" in files
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}


def test_same_step_saved_again_replaces_the_old_folder(tmp_path):
    *_, ckpt = _setup(tmp_path)
    ckpt.save(TrainState(step=5))
    ckpt.save(TrainState(step=5, epoch=1))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-5"]
    assert json.loads((tmp_path / "checkpoints" / "step-5" / "trainer_state_0.json").read_text())["epoch"] == 1


@pytest.mark.parametrize("target", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_pickle_payload_is_refused_not_run(tmp_path, target):
    *_, ckpt = _setup(tmp_path)
    ckpt.save(TrainState(step=5))
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, tmp_path / "checkpoints" / "step-5" / target)
    write_manifest(tmp_path / "checkpoints" / "step-5", 5, 1)  # whoever can write the payload can write this too
    with pytest.raises(UserError, match=f"{target} holds pickled objects that could run code: refused"):
        ckpt.restore(epochs=2)
    assert not marker.exists()


def test_registered_objects_load_weights_only_even_without_the_precheck(tmp_path, monkeypatch):
    """accelerate itself loads custom_checkpoint_*.pkl with weights_only=False; our load_state call closes that."""
    *_, ckpt = _setup(tmp_path)
    ckpt.save(TrainState(step=5))
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "checkpoints" / "step-5" / "custom_checkpoint_0.pkl")
    write_manifest(tmp_path / "checkpoints" / "step-5", 5, 1)
    monkeypatch.setattr(checkpointer, "check_safe", lambda *a, **k: None)
    with pytest.raises(UserError, match="does not load into this run"):
        ckpt.restore(epochs=2)
    assert not marker.exists()


def test_damaged_or_missing_checkpoints_are_clear_errors(tmp_path):
    *_, ckpt = _setup(tmp_path, keep=3)
    with pytest.raises(UserError, match=r"no complete checkpoint in .*start it again without --resume"):
        ckpt.restore(epochs=2)
    ckpt.save(TrainState(step=5))
    rng = tmp_path / "checkpoints" / "step-5" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:100])  # accelerate alone would skip it silently and resume inexactly
    with pytest.raises(UserError, match=r"no usable checkpoint .*step-5 \(random_states_0.pkl 100 bytes, \d+ written"):
        ckpt.restore(epochs=2)
    write_manifest(rng.parent, 5, 1)  # torn after a manifest that agrees: the safe load still finds it
    with pytest.raises(UserError, match=r"step-5 \(random_states_0.pkl is unreadable \(.*start the run again"):
        ckpt.restore(epochs=2)
    (tmp_path / "checkpoints" / "step-5" / "trainer_state_0.json").write_text("{")
    write_manifest(rng.parent, 5, 1)
    with pytest.raises(UserError, match=r"step-5 \(trainer_state_0.json damaged: JSONDecodeError\)"):
        ckpt.restore(epochs=2)


def test_a_process_count_change_is_refused(tmp_path):
    *_, ckpt = _setup(tmp_path)
    ckpt.save(TrainState(step=5))
    path = tmp_path / "checkpoints" / "step-5" / "trainer_state_0.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_processes": 2}))
    with pytest.raises(UserError, match=r"trained with 2 process.*relaunch with 2"):
        ckpt.restore(epochs=2)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    accelerator, *_, ckpt = _setup(tmp_path)
    ckpt.save(TrainState(step=5))
    real_save_state = accelerator.save_state

    def fill_disk(output_dir):  # writes part of the checkpoint, then the disk is full
        real_save_state(output_dir)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))

    monkeypatch.setattr(accelerator, "save_state", fill_disk)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*No space left on device.*step-5 is intact"):
        ckpt.save(TrainState(step=10))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-5"]  # the partial one is removed
    monkeypatch.undo()
    assert ckpt.restore(epochs=2).step == 5


# ---- --resume: which folder, which settings --------------------------------------------------------------------


def _run_folder(tmp_path: Path, name: str = "exp", **train) -> Path:
    run_dir = tmp_path / "runs" / name
    (run_dir / "checkpoints" / "step-5").mkdir(parents=True)
    record = Config().to_dict()
    record["train"].update(train)
    record["launch"] = {"num_processes": 1}  # records are ignored when read back
    (run_dir / "config.yaml").write_text(yaml.safe_dump(record))
    return run_dir


def test_find_run_dir(tmp_path):
    old = _run_folder(tmp_path, "exp")
    new = _run_folder(tmp_path, "exp2")
    os.utime(old / "checkpoints" / "step-5", (1, 1))
    assert find_run_dir(str(old), "ignored", None) == old
    assert find_run_dir(LATEST, str(tmp_path / "runs"), None) == new  # the most recently saved
    assert find_run_dir(LATEST, str(tmp_path / "runs"), "exp") == old
    with pytest.raises(UserError, match="no such run folder"):
        find_run_dir(str(tmp_path / "nope"), "runs", None)
    with pytest.raises(UserError, match="no run with a checkpoint under"):
        find_run_dir(LATEST, str(tmp_path / "empty"), None)
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match="not a trainer run folder"):
        find_run_dir(str(tmp_path / "other"), "runs", None)


def test_resume_config_allows_only_harmless_changes(tmp_path):
    run_dir = _run_folder(tmp_path, epochs=2, batch_size=64)
    cfg = resume_config(run_dir, {"data": {"workers": 2}, "run": {"tracker": "none", "name": "x", "project": "p"}})
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.workers) == (2, 64, 2)
    assert (cfg.run.tracker, cfg.run.name, cfg.run.project) == ("none", "exp", "runs/train")  # located, not renamed
    # The same value as stored is fine: the original command line with --resume added.
    assert resume_config(run_dir, {"train": {"batch_size": 64}}).train.batch_size == 64
    with pytest.raises(UserError, match="--batch-size 128 differs from the run's 64"):
        resume_config(run_dir, {"train": {"batch_size": 128}})
    with pytest.raises(UserError, match="--model resnet18 differs from the run's resnet10t"):
        resume_config(run_dir, {"model": {"model": "resnet18"}})
    (run_dir / "config.yaml").write_text("train: [1")
    with pytest.raises(UserError, match=r"its config\.yaml is unusable"):
        resume_config(run_dir, {})


def test_second_signal_exits_at_once(tmp_path):
    """The first Ctrl-C is noted (the loop finishes its step and saves); the second one ends the process now."""
    code = (
        "import os, signal, time\n"
        "from accelerate import Accelerator\n"
        "from trainer.run.checkpointer import Checkpointer\n"
        "from trainer.config import CheckpointConfig\n"
        f"with Checkpointer(Accelerator(cpu=True), {str(tmp_path)!r}, CheckpointConfig()) as c:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('noted', c.signum == signal.SIGINT, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "noted True"
    assert proc.returncode == 128 + signal.SIGINT


def test_repeated_sigterm_still_saves(tmp_path):
    """Under SLURM a rank gets SIGTERM from the scheduler and again from its launcher: one request, not an abort."""
    code = (
        "import os, signal\n"
        "from accelerate import Accelerator\n"
        "from trainer.run.checkpointer import Checkpointer\n"
        "from trainer.config import CheckpointConfig\n"
        f"with Checkpointer(Accelerator(cpu=True), {str(tmp_path)!r}, CheckpointConfig()) as c:\n"
        "    for _ in range(2):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        print('noted', c.signum == signal.SIGTERM, flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n")[:2] == ["noted True", "noted True"], proc.stderr
    assert proc.returncode == 0
