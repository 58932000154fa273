"""Issue 19, part A: nothing non-finite is saved, a resumed run sees the data it trained on, checkpoints are complete
or not used, and the folder-scan cache proves itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from test_sources import picture

from trainer.config import CheckpointConfig, DataConfig, UserError
from trainer.data import Data, load_splits
from trainer.data.fingerprint import data_fingerprint
from trainer.data.sources import classfolder, scancache
from trainer.run.checkpointer import Checkpointer, TrainState
from trainer.run.finite import BufferSnapshot
from trainer.run.manifest import RunShape, fingerprint_changes, write_manifest
from trainer.run.weights import save_epoch_weights, save_weights

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _checkpointer(run_dir: Path, fingerprint: dict | None = None, data_changed: str = ""):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    notes: list[str] = []
    cfg = CheckpointConfig(keep_checkpoints=3, data_changed=data_changed)
    return model, optimizer, Checkpointer(accelerator, run_dir, cfg, fingerprint=fingerprint, note=notes.append), notes


def _step(model, optimizer):
    model(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- case 1: nothing non-finite is saved ----------------------------------------------------------------------------
def test_a_skipped_window_leaves_the_batchnorm_statistics_as_they_were():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).train()
    model(torch.randn(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = BufferSnapshot(model)
    for _ in range(2):  # one accumulation window of two micro-batches, the second non-finite
        snapshot.take()
        model(torch.randn(8, 4))
    model(torch.full((8, 4), float("nan")))
    assert not torch.isfinite(model[1].running_mean).all()
    snapshot.restore()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # num_batches_tracked included
    snapshot.take()  # the next window takes a new copy; an applied update keeps what its forwards did
    model(torch.randn(8, 4))
    snapshot.release()
    assert int(model[1].num_batches_tracked) == int(before["1.num_batches_tracked"]) + 1


def test_the_snapshot_covers_every_buffer_and_takes_one_copy_per_window():
    """Every buffer of a timm model is held (running stats and batch counts); a second take() within the window keeps
    the window's first copy. Its cost per step is in bench/overhead.py's ratio (train_one_epoch takes it)."""
    import timm

    model = timm.create_model("test_resnet", num_classes=10).train()
    snapshot = BufferSnapshot(model)
    assert len(snapshot.buffers) == len(list(model.buffers())) > 10
    before = [b.clone() for b in model.buffers()]
    snapshot.take()
    model(torch.randn(4, 3, 32, 32))
    snapshot.take()  # the same window: the copy from before the first forward stays
    model(torch.randn(4, 3, 32, 32))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))
    snapshot.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))


def test_a_checkpoint_with_nan_weights_is_refused_and_the_previous_kept(tmp_path):
    model, optimizer, ckpt, _ = _checkpointer(tmp_path)
    _step(model, optimizer)
    ckpt.save(TrainState(step=5))
    kept = _files(tmp_path / "checkpoints" / "step-5")
    with torch.no_grad():
        model[1].running_var.fill_(float("nan"))
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(UserError) as e:
        ckpt.save(TrainState(step=10))
    assert str(e.value).startswith(
        "step 10: refusing to save checkpoint step-10: 2 non-finite tensor(s) (model.0.weight, model.1.running_var); "
    )
    assert "step-5 is intact" in str(e.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-5"]
    assert _files(tmp_path / "checkpoints" / "step-5") == kept


def test_weights_with_nan_are_refused_and_the_previous_file_kept(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    save_epoch_weights(accelerator, model, tmp_path, {"epoch": "1"}, is_best=True, step=12)
    kept = _files(tmp_path)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    with pytest.raises(UserError, match=r"^step 24: refusing to save the weights: 1 non-finite tensor\(s\) \(bias\)"):
        save_epoch_weights(accelerator, model, tmp_path, {"epoch": "2"}, is_best=True, step=24)
    with pytest.raises(UserError, match=r"refusing to save .*x.safetensors: 1 non-finite tensor\(s\) \(bias\)"):
        save_weights(model.state_dict(), tmp_path / "x.safetensors", {})
    assert _files(tmp_path) == kept
    assert torch.isfinite(load_file(str(tmp_path / "last.safetensors"))["bias"]).all()


def test_the_nonfinite_error_says_which_remedies_a_resume_refuses(tmp_path):
    *_, ckpt, _ = _checkpointer(tmp_path)
    with pytest.raises(UserError, match=r"lower --lr, set --clip-grad, or pass --skip-nonfinite$"):
        ckpt.check_step(torch.tensor(1.0), step=3, skip_nonfinite=False)
    ckpt.resumed = True
    with pytest.raises(UserError, match=r"--resume refuses --lr, --clip-grad and --skip-nonfinite: start a new run"):
        ckpt.check_step(torch.tensor(1.0), step=3, skip_nonfinite=False)


# -- case 3: complete or not used -------------------------------------------------------------------------------------
def test_an_incomplete_newest_checkpoint_falls_back_to_the_newest_complete_one(tmp_path):
    model, optimizer, ckpt, notes = _checkpointer(tmp_path)
    _step(model, optimizer)
    ckpt.save(TrainState(step=5, epoch=1))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, optimizer)
    ckpt.save(TrainState(step=10, epoch=2))
    (tmp_path / "checkpoints" / "step-10" / "random_states_0.pkl").unlink()
    _step(model, optimizer)
    state = ckpt.restore(epochs=3)
    assert (state.step, state.epoch) == (5, 1)
    assert notes == ["--resume: skipped checkpoint step-10 (random_states_0.pkl missing); resuming from step-5"]
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())
    assert (tmp_path / "checkpoints" / "step-10").is_dir()  # left for the user to look at, replaced when re-reached


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"batches_in_epoch": 1000}, "batches_in_epoch 1000, an epoch here has 12 batches"),
        ({"step": 99}, "step 99, but epoch 1 + 0 batches make step 12"),
        ({"loss_sum": float("nan")}, "state values out of range: loss_sum nan"),
        ({"epoch": -1}, "state values out of range: epoch -1"),
        ({"skipped_steps": 20}, "best_epoch or skipped_steps beyond the run's position"),
    ],
)
def test_state_values_that_do_not_fit_the_run_are_not_trusted(tmp_path, values, why):
    *_, ckpt, notes = _checkpointer(tmp_path)
    ckpt.save(TrainState(step=6, batches_in_epoch=6))
    ckpt.save(TrainState(step=12, epoch=1))
    folder = tmp_path / "checkpoints" / "step-12"
    state = json.loads((folder / "trainer_state_0.json").read_text())
    (folder / "trainer_state_0.json").write_text(json.dumps({**state, **values}))
    write_manifest(folder, 12, 1)  # valid JSON, a manifest that agrees: only the values are wrong
    restored = ckpt.restore(epochs=3, shape=RunShape(epochs=3, batches_per_epoch=12))
    assert (restored.step, restored.batches_in_epoch) == (6, 6)
    assert notes == [f"--resume: skipped checkpoint step-12 ({why}); resuming from step-6"]


def test_no_usable_checkpoint_is_one_line_naming_each(tmp_path):
    *_, ckpt, _ = _checkpointer(tmp_path)
    ckpt.save(TrainState(step=5))
    model_file = tmp_path / "checkpoints" / "step-5" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-10])
    with pytest.raises(
        UserError, match=r"^--resume: no usable checkpoint in .*: step-5 \(model.safetensors \d+ bytes, "
    ):
        ckpt.restore(epochs=2)


# -- case 2: the same data ------------------------------------------------------------------------------------------
def _folder(root: Path, layout: dict[str, int]) -> Path:
    for split in ("train", "val"):
        for c, (name, count) in enumerate(layout.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count if split == "train" else 2):
                picture(40 * c + i).save(root / split / name / f"{name}{i}.png")
    return root


def _fingerprint(root: Path) -> dict:
    cfg = DataConfig(data=str(root))
    return data_fingerprint(cfg, Data(*load_splits(cfg)))


def test_fingerprint_says_what_changed_in_a_folder(tmp_path):
    root = _folder(tmp_path / "d", {"cat": 4, "dog": 4})
    first = _fingerprint(root)
    assert _fingerprint(root) == first and first["images_per_class"] == {"train": [4, 4], "val": [2, 2]}
    picture(9).save(root / "train" / "cat" / "late.png")
    assert fingerprint_changes(first, _fingerprint(root)) == [
        "train images 8 -> 9",
        "train images per class: cat 4 -> 5",
    ]
    (root / "train" / "cat" / "late.png").unlink()
    for a, b in (("cat", "x"), ("dog", "cat"), ("x", "dog")):
        (root / "train" / a).rename(root / "train" / b)
    assert fingerprint_changes(first, _fingerprint(root)) == ["train classes swapped: cat <-> dog"]
    for a, b in (("cat", "x"), ("dog", "cat"), ("x", "dog")):
        (root / "train" / a).rename(root / "train" / b)
    assert fingerprint_changes(first, _fingerprint(root)) == []
    shutil.copytree(root / "train" / "dog", root / "train" / "emu")
    assert fingerprint_changes(first, _fingerprint(root)) == ["train images 8 -> 12", "classes added: emu"]
    shutil.rmtree(root / "train" / "emu")
    picture(200).save(root / "train" / "cat" / "cat0.png")  # rewritten in place: only the listing says so
    assert fingerprint_changes(first, _fingerprint(root)) == [
        "files replaced or rewritten in the folder: sizes or modification times differ"
    ]


def test_fingerprint_of_shards_names_and_sizes(tmp_path):
    import io

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    png = io.BytesIO()
    picture(1).save(png, format="PNG")
    rows = {"image": [{"bytes": png.getvalue(), "path": None}] * 4, "label": [0, 1, 0, 1]}
    for name in ("train", "val"):
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "p" / f"{name}.parquet"))
    old = _fingerprint(tmp_path / "p")
    assert old["shards"] == {n: (tmp_path / "p" / n).stat().st_size for n in ("train.parquet", "val.parquet")}
    assert old["class_files"] == {} and old["images_per_class"] == {"train": [2, 2], "val": [2, 2]}
    new = {**old, "shards": {**old["shards"], "train.parquet": 1, "train-2.parquet": 3}}
    assert fingerprint_changes(old, new) == ["shards added, removed or resized: train-2.parquet, train.parquet"]


def test_a_resume_on_changed_data_is_refused_or_continued_on_purpose(tmp_path):
    stored = {"classes": ["a", "b"], "train_images": 4800, "val_images": 100}
    changed = {**stored, "train_images": 5200}
    *_, ckpt, _ = _checkpointer(tmp_path, fingerprint=stored)
    ckpt.save(TrainState(step=5))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"data": "d"}}))
    *_, ckpt, _ = _checkpointer(tmp_path, fingerprint=changed)
    with pytest.raises(UserError) as e:
        ckpt.restore(epochs=2)
    assert str(e.value) == (
        "--resume: the data changed since step-5 (train images 4800 -> 5200); start a new run without --resume, "
        "or continue on this data on purpose with --resume --data-changed ok"
    )
    assert "delete" not in str(e.value)
    *_, ckpt, notes = _checkpointer(tmp_path, fingerprint={**stored, "classes": ["a", "b", "c"]}, data_changed="ok")
    with pytest.raises(UserError, match=r"classes added: c\); the model was built for 2 classes, so it cannot"):
        ckpt.restore(epochs=2)
    *_, ckpt, notes = _checkpointer(tmp_path, fingerprint=changed, data_changed="ok")
    assert ckpt.restore(epochs=2).step == 5
    assert notes == ["--data-changed ok: resuming step-5 on changed data (train images 4800 -> 5200)"]
    record = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert record["data_changes"] == [{"resumed_at_step": 5, "changes": ["train images 4800 -> 5200"]}]


# -- case 4: the scan cache proves itself -----------------------------------------------------------------------------
def test_damaged_label_bytes_in_the_scan_cache_cost_a_rescan(tmp_path, capsys):
    import pyarrow as pa

    root = _folder(tmp_path / "d", {"cat": 3, "dog": 3})
    first = classfolder.scan_image_folder(root, str(root))
    labels = list(first.splits["train"]["label"])
    (entry,) = Path(datasets.config.HF_DATASETS_CACHE).glob(f"{scancache.CACHE_FORMAT}/*/*")
    with pa.memory_map(str(entry / "train.arrow")) as source:
        table = pa.ipc.open_stream(source).read_all()
    shifted = table.set_column(1, "label", pa.array(labels[1:] + labels[:1], pa.int64()))
    (entry / "train.arrow").unlink()  # valid Arrow, the right length, the wrong labels
    scancache.write_arrow(entry / "train.arrow", shifted)
    again = classfolder.scan_image_folder(root, str(root))
    assert list(again.splits["train"]["label"]) == labels
    err = capsys.readouterr().err.splitlines()
    assert err == [f"trainer: warning: the scan cache of {root} is damaged (train.arrow checksum differs); rescanning"]
    classfolder.scan_image_folder(root, str(root))
    assert capsys.readouterr().err == ""  # whole again
