"""Faults from the environment, on real runs of the CLI (issue 19): a second writer in a run folder, a full disk, a
damaged checkpoint, SIGTERM during a conversion. Each asserts the exit code, the one line, and that nothing was lost."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import check, clean_env, config_of, results, run, torchrun_script, trainer
from safetensors.torch import load_file

ARGS = ("--data", "digits", "--model", "test_resnet", "--imgsz", "16", "--tracker", "none", "--workers", "0")
HOLD = "import sys, time; from trainer.run.rundirs import lock_run_dir; lock_run_dir(sys.argv[1]); "
HOLD += "print('held', flush=True); time.sleep(120)"


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The run ended with `code` and said why in one `trainer: error:` line, without a traceback."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("trainer: error:")]
    assert len(set(lines)) == 1, proc.stderr[-3000:]
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file's hash but the lock file's (it names the latest process that held it)."""
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != ".trainer.lock")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A finished 2-epoch run (a checkpoint per epoch, step-12 and step-24), shared by the tests; copy it to change."""
    work = tmp_path_factory.mktemp("faults")
    (work / "home").mkdir()
    check(run(trainer("train", *ARGS, "--epochs", "2"), work))
    return work / "runs" / "train" / "exp"


def resumable(two_epochs: Path, workdir: Path) -> Path:
    """A copy of the run stopped after epoch 1: its last checkpoint (step-24) removed."""
    run_dir = workdir / "runs" / "train" / "exp"
    shutil.copytree(two_epochs, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-24")
    return run_dir


@contextlib.contextmanager
def holder(run_dir: Path, cwd: Path):
    """Another process writing `run_dir`: it holds the run folder's lock, as a training run does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        cwd=cwd,
        env=clean_env(cwd / "home"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_locked_run_folder_is_refused_to_resume_and_on_every_rank(two_epochs: Path, workdir: Path):
    run_dir = resumable(two_epochs, workdir)
    with holder(run_dir, workdir) as other:
        before = digest(run_dir)
        line = one_error_line(run(trainer("train", "--resume", str(run_dir)), workdir))
        assert f"run folder {run_dir} is in use by PID {other.pid} on host {os.uname().nodename}" in line
        # Two gloo ranks claiming the folder for a new run (--exist-ok): the main process's refusal reaches both.
        script = Path(__file__).with_name("lock_ranks.py")
        check(run(torchrun_script(2, str(script), str(run_dir.parent), run_dir.name, str(workdir)), workdir))
        ranks = [json.loads((workdir / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["world_size"] for r in ranks] == [2, 2]
        assert ranks[0]["refused"] == ranks[1]["refused"] == line.removeprefix("trainer: error: ")
        assert digest(run_dir) == before  # nothing written by the refused runs
    # The holder was killed with SIGKILL: the OS dropped its lock, another process takes it at once.
    check(run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(run_dir)], workdir))


def test_runs_started_at_once_get_a_folder_each(workdir: Path):
    """Six processes picking the next free `same{N}` at the same instant: each claims its own (mkdir is atomic)."""
    at = time.time() + 3  # after every interpreter has started
    code = "import sys, time; from trainer.run.rundirs import RunFolder, make_run_dir; time.sleep(float(sys.argv[1]) - "
    code += "time.time()); print(make_run_dir(RunFolder('runs/x', 'same')))"
    cmd = [sys.executable, "-c", code, str(at)]
    procs = [
        subprocess.Popen(cmd, cwd=workdir, env=clean_env(workdir / "home"), stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    chosen = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(chosen) == sorted({*chosen}) and len(chosen) == 6, chosen
    assert sorted(chosen) == sorted(["runs/x/same", *(f"runs/x/same{i}" for i in range(2, 7))])


def _mount_tmpfs(where: Path, size: str = "20m") -> None:
    where.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command on this machine")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or 'not root?'})")


def _fill(disk: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))


@pytest.fixture
def small_disk(workdir: Path):
    disk = workdir / "disk"
    _mount_tmpfs(disk)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_training_and_export_say_so_in_one_line_and_keep_files(two_epochs: Path, workdir: Path, small_disk):
    weights = two_epochs / "weights" / "best.safetensors"
    onnx = small_disk / "model.onnx"
    onnx.write_bytes(good := b"an earlier export")  # what a failed export must leave as it was
    # Room for config.yaml and results.csv, not for a weights file (1.5 MB): the first save fails.
    _fill(small_disk, 1_000_000)
    proc = run(trainer("train", *ARGS, "--epochs", "1", "--project", str(small_disk / "runs")), workdir)
    assert one_error_line(proc).startswith(f"trainer: error: no space left on {small_disk / 'runs' / 'exp'}")
    run_dir = small_disk / "runs" / "exp"
    assert [r["epoch"] for r in results(run_dir)] == ["1"]  # the row of the epoch that ran, whole
    assert not [p for p in (run_dir / "weights").iterdir() if p.suffix != ".safetensors"]  # no torn leftovers
    for file in (run_dir / "weights").iterdir():
        load_file(str(file))
    (small_disk / "filler").unlink()
    _fill(small_disk, 200_000)
    line = one_error_line(run(trainer("export", "--weights", str(weights), "--output", str(onnx)), workdir))
    assert line == (
        f"trainer: error: no space left on {onnx}; free some space there and run the command again; "
        "an earlier export there is kept as it was"
    )
    assert onnx.read_bytes() == good
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "model.onnx", "runs"]  # no temporary files


def test_a_truncated_checkpoint_is_one_line(two_epochs: Path, workdir: Path):
    run_dir = resumable(two_epochs, workdir)
    model = run_dir / "checkpoints" / "step-12" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    before = digest(run_dir)
    line = one_error_line(run(trainer("train", "--resume", str(run_dir)), workdir))
    assert line.startswith("trainer: error: --resume: no usable checkpoint in "), line
    assert "step-12 (model.safetensors" in line, line
    assert "truncated or changed" in line, line  # the manifest's sizes tell, before safetensors reads a byte
    assert digest(run_dir) == before
    assert load_file(str(run_dir / "weights" / "last.safetensors"))


def test_convert_cleans_up_on_sigterm_and_removes_a_stale_temporary_folder(workdir: Path):
    stale = workdir / ".shards.tmp-999999999"  # left by a conversion killed with -9 (no such process now)
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"partial")
    cmd = trainer("data", "convert", "digits", "shards", "--shard-size", "1")  # one sample a shard: a slow conversion
    proc = subprocess.Popen(cmd, cwd=workdir, env=clean_env(workdir / "home"), stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(workdir.glob(f".shards.tmp-{proc.pid}/*.tar")):
        assert proc.poll() is None and time.time() < deadline, "the conversion never started writing shards"
        time.sleep(0.01)
    assert not stale.exists()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "conversion stopped, nothing written" in out
    assert sorted(p.name for p in workdir.iterdir()) == ["home"]  # no DST, no temporary folder


def test_a_class_that_lost_every_image_after_the_scan_stops_both_ranks_in_one_line(workdir: Path):
    """Files broken in place with their size and modification time kept: the scan cache stays valid, so only the
    loop can notice that a class no longer reaches the model (it trained on substitutes only, silently)."""
    from PIL import Image

    root = workdir / "pets"
    for split, n in (("train", 16), ("val", 4)):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), (100 * c, 10 * i, 50)).save(root / split / name / f"{i}.jpg")
    fast = ("--data", str(root), "--model", "test_resnet", "--imgsz", "16", "--tracker", "none", "--workers", "0")
    fast += ("--batch-size", "8", "--epochs", "1")
    check(run(trainer("train", *fast), workdir))  # scans the folder and stores the scan
    for image in (root / "train" / "cat").iterdir():
        st = image.stat()
        image.write_bytes(b"\0" * st.st_size)
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc = run(torchrun_script(2, "-m", "trainer", "train", *fast, "--name", "lost"), workdir)
    assert proc.returncode != 0
    lines = {line for line in proc.stderr.splitlines() if line.startswith("trainer: error:")}
    run_dir = workdir / "runs" / "train" / "lost"
    assert lines == {
        "trainer: error: every image of class cat is unreadable now: epoch 1 trained on none of its 16 images, and "
        f"the first 16 fail to read (e.g. {root}/train/cat/0.jpg: not an image); the epoch's weights are not saved: "
        "make the files readable again, then continue with trainer train --resume runs/train/lost"
    }, lines
    assert config_of(run_dir)["launch"]["num_processes"] == 2
    assert not list((run_dir / "weights").glob("*.safetensors"))
