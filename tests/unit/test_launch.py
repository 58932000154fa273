"""Scale-out decisions that need no second process: --resume auto, the start-up agreement check, --dist-timeout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trainer.cli import build_parser, main, resolve_resume
from trainer.config import Config, RunConfig, UserError
from trainer.run.resume import auto_resume, finished
from trainer.train.launch import build_accelerator, launch_problem


def _run_folder(root: Path, name: str = "big", epoch: int = 1, **train) -> Path:
    """A run folder as a 2-epoch run leaves it after `epoch` epochs: config.yaml and a complete checkpoint."""
    run_dir = root / "runs" / "train" / name
    step = run_dir / "checkpoints" / "step-25"
    step.mkdir(parents=True)
    record = Config().to_dict()
    record["train"].update(epochs=2, **train)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(record))
    (step / "trainer_state_0.json").write_text(json.dumps({"epoch": epoch, "step": 25}))
    return run_dir


def _given(root: Path, name: str = "big", **train) -> dict:
    return {"train": {"epochs": 2, **train}, "run": {"project": str(root / "runs" / "train"), "name": name}}


def test_auto_resume_starts_where_there_is_no_checkpoint(tmp_path):
    cfg, resume_dir = auto_resume(_given(tmp_path))  # no folder yet
    assert resume_dir is None and cfg.run.exist_ok and cfg.run.name == "big"  # that folder, not big2
    # A checkpoint being written (or torn by a kill) never counts: a new run in the same folder.
    (tmp_path / "runs" / "train" / "big" / "checkpoints" / ".tmp-step-5").mkdir(parents=True)
    assert auto_resume(_given(tmp_path))[1] is None


def test_auto_resume_continues_a_complete_checkpoint(tmp_path):
    run_dir = _run_folder(tmp_path, batch_size=64)
    cfg, resume_dir = auto_resume({**_given(tmp_path, batch_size=64), "data": {"workers": 2}})
    assert resume_dir == run_dir and cfg.train.batch_size == 64 and cfg.data.workers == 2
    with pytest.raises(UserError, match="--batch-size 128 differs from the run's 64"):
        auto_resume(_given(tmp_path, batch_size=128))  # another run under the same --name
    (run_dir / "config.yaml").unlink()
    with pytest.raises(UserError, match=r"has checkpoints but no config\.yaml; choose another --name"):
        auto_resume(_given(tmp_path))


def test_resume_auto_flag_and_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    parser, dests = build_parser()
    args = parser.parse_args(["train", "--resume", "auto", "--name", "big", "--epochs", "2"])
    assert resolve_resume(args, dests) == (auto_resume({"train": {"epochs": 2}, "run": {"name": "big"}})[0], None)

    run_dir = _run_folder(tmp_path, epoch=1)
    assert not finished(run_dir, epochs=2)
    (run_dir / "checkpoints" / "step-50").mkdir()
    (run_dir / "checkpoints" / "step-50" / "trainer_state_0.json").write_text(json.dumps({"epoch": 2}))
    assert finished(run_dir, epochs=2)
    # The same command once more after the run finished: nothing to do, and no error for a scheduler to retry.
    assert main(["train", "--resume", "auto", "--name", "big", "--epochs", "2", "--tracker", "none"]) == 0
    assert "already finished its 2 epochs; nothing to do" in capsys.readouterr().err
    (run_dir / "checkpoints" / "step-50" / "trainer_state_0.json").write_text("{torn")
    assert not finished(run_dir, epochs=2)  # left to the checkpoint loader, which names the damage


def _rank(rank: int, host: str = "a", machine: str = "0", run: str = "") -> dict:
    return {"rank": rank, "host": host, "machine": machine, "run": run}


def test_launch_problem_names_what_the_ranks_disagree_on():
    # Two machines of 2 processes each, numbered by c10d; two launchers on one host (as in the loopback test).
    assert launch_problem([_rank(0, "a", "0"), _rank(1, "a", "0"), _rank(2, "b", "1"), _rank(3, "b", "1")]) == ""
    assert launch_problem([_rank(0, "a", "0"), _rank(1, "a", "1")]) == ""
    assert "claim ranks [0, 0]" in launch_problem([_rank(0, "a"), _rank(0, "b")])
    assert "machines a, b all claim machine rank 0" in launch_problem([_rank(0, "a"), _rank(1, "b")])
    seen = [_rank(0, run="runs/train/big/step-10"), _rank(1, "a", run="")]
    problem = launch_problem(seen)
    assert "see different checkpoints (rank 0 on a: runs/train/big/step-10; rank 1 on a: a new run)" in problem
    assert "filesystem every machine shares" in problem


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(("minutes", "seconds"), [(0.5, 30), (10, 601)])
def test_dist_timeout_reaches_the_process_group(minutes, seconds):
    """What accelerate hands to init_process_group; it drops a value equal to its own default of 10 minutes."""
    accelerator = build_accelerator(Config(run=RunConfig(dist_timeout=minutes, tracker="none")))
    assert accelerator.init_handler.to_kwargs()["timeout"].total_seconds() == seconds


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_dist_backend_in_a_single_process_trains_as_one_process(monkeypatch):
    """`--dist-backend gloo` in a plain run (one process, no launcher) is one process, not a group never joined."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    accelerator = build_accelerator(Config(run=RunConfig(dist_backend="gloo", tracker="none")))
    assert accelerator.num_processes == 1


def test_resume_of_a_run_stopped_early_is_refused_before_anything_is_rewritten(tmp_path, monkeypatch, capsys):
    """--resume RUN_DIR of a run --patience ended: one line, exit 2, its files untouched (it used to resume and
    rewrite its plots); --resume auto says there is nothing to do."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    run_dir = _run_folder(tmp_path, epoch=1, patience=1)
    state = {"epoch": 1, "step": 25, "stopped_epoch": 1, "epochs_since_best": 1}
    (run_dir / "checkpoints" / "step-25" / "trainer_state_0.json").write_text(json.dumps(state))
    (run_dir / "results.png").write_bytes(b"plot")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run_dir), "--tracker", "none"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "the run stopped early at epoch 1 (--patience 1); nothing to resume" in err[0], err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
