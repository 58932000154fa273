"""Run folders, weight files and resumable checkpoints.

Each call site says whether every rank or only the main process runs it."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from trainer.config import CheckpointConfig, UserError
from trainer.data import Preprocess
from trainer.resume import CHECKPOINTS, checkpoint_dirs


def _proc_umask() -> int | None:
    """The umask as Linux reports it, read without changing it (None where /proc cannot say)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except (OSError, ValueError):
        return None


# Elsewhere os.umask reads the umask only by setting it: done once, at import in the main thread, before any thread
# could create a file under the temporary value.
_START_UMASK = _proc_umask()
if _START_UMASK is None:
    _START_UMASK = os.umask(0o022)
    os.umask(_START_UMASK)


def match_umask(path: Path) -> None:
    """Give a file we wrote (every file under it, for a folder) the mode the user's umask gives any new file.

    safetensors writes through a private temporary file (mode 0600): teammates could not read shared weights."""
    umask = _proc_umask()
    mode = 0o666 & ~(_START_UMASK if umask is None else umask)
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        os.chmod(file, mode)


def increment_path(path: Path, exist_ok: bool) -> Path:
    """`runs/train/exp` -> `runs/train/exp2`, `exp3`, ... (YOLOv5 style) unless `exist_ok`."""
    if exist_ok or not path.exists():
        return path
    pattern = re.compile(re.escape(path.name) + r"(\d+)$")
    taken = [int(m.group(1)) for p in path.parent.iterdir() if (m := pattern.match(p.name))]
    return path.with_name(f"{path.name}{max([1, *taken]) + 1}")


def create_run_dir(accelerator: Accelerator, project: str, name: str, exist_ok: bool, weights_dir: bool = True) -> Path:
    """Every rank calls this; the main process picks and creates the folder (with `weights/` unless told not
    to), the others receive its path."""
    chosen = [None]
    if accelerator.is_main_process:
        run_dir = increment_path(Path(project) / name, exist_ok)
        try:
            (run_dir / "weights" if weights_dir else run_dir).mkdir(parents=True, exist_ok=True)
            chosen = [str(run_dir)]
        except OSError as e:
            chosen = [f"error: cannot create run folder {run_dir}: {e.strerror}; choose another --project"]
    # Collective: every rank must take part, or the others wait forever.
    chosen = broadcast_object_list(chosen, from_process=0) if accelerator.num_processes > 1 else chosen
    if chosen[0].startswith("error: "):
        raise UserError(chosen[0].removeprefix("error: "))
    return Path(chosen[0])


def weights_metadata(model_name: str, class_names: list[str], pre: Preprocess, **extra) -> dict[str, str]:
    """safetensors metadata (strings only): enough to rebuild the model and its preprocessing without trainer."""
    meta = {
        "format": "pt",
        "model_name": model_name,
        "num_classes": str(len(class_names)),
        "class_names": json.dumps(class_names),
        "imgsz": str(pre.imgsz),
        "in_chans": str(pre.in_chans),
        "mean": json.dumps(list(pre.mean)),
        "std": json.dumps(list(pre.std)),
        "interpolation": pre.interpolation,
        "crop_pct": str(pre.crop_pct),
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def save_epoch_weights(
    accelerator: Accelerator,
    model,
    weights_dir: Path,
    metadata: dict[str, str],
    is_best: bool,
    best_model=None,
    best_metadata: dict[str, str] | None = None,
):
    """Every rank calls this: get_state_dict gathers sharded (FSDP/DeepSpeed) weights; the main process writes
    last.safetensors, and best.safetensors when `is_best` (from `best_model`, e.g. the EMA, when given)."""
    # Collective under FSDP: every rank sends its shards and the main process receives the full, plain timm state
    # dict (on the CPU; the other ranks get an empty one). Under DDP it is the local state dict.
    state_dict = accelerator.get_state_dict(model)
    # is_best is the same on every rank (metrics are gathered), so all ranks make this call or none.
    other_best = is_best and best_model is not None and best_model is not model
    best_state = accelerator.get_state_dict(best_model) if other_best else state_dict  # Collective: as above
    if accelerator.is_main_process:
        save_weights(state_dict, weights_dir / "last.safetensors", metadata)
        if is_best:
            save_weights(best_state, weights_dir / "best.safetensors", best_metadata or metadata)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Main process only. Writes to a temporary name first so a kill mid-write never leaves a torn file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    match_umask(tmp)
    tmp.replace(path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """Metadata of a weights file written by `save_weights`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# ---- Resumable checkpoints: {run}/checkpoints/step-N, complete or absent ------------------------------------------

STATE_FILE = "trainer_state_{rank}.json"  # one per rank: the loss sums of a partial epoch differ between ranks
BUFFERS_FILE = "rank_buffers_{rank}.safetensors"  # one per rank: buffers that differ between ranks (see Checkpointer)


@dataclass
class TrainState:
    """The loop's own position and records, saved beside accelerate's model/optimizer/scheduler/RNG files."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps done
    batches_in_epoch: int = 0  # micro-batches of epoch `epoch + 1` already trained (0 at an epoch boundary)
    loss_sum: float = 0.0  # this rank's partial-epoch sums, so the epoch's train/loss comes out as if never stopped
    seen: float = 0.0
    best_top1: float = -1.0
    best_epoch: int = 0
    skipped_steps: int = 0  # non-finite steps skipped with --skip-nonfinite
    num_processes: int = 1


class Stopped(Exception):
    """Raised on every rank after a SIGTERM/SIGINT once the checkpoint is saved; the CLI exits with 128 + signal."""

    def __init__(self, signum: int, checkpoint_dir: Path, run_dir: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving {checkpoint_dir}")
        self.signum, self.checkpoint_dir, self.run_dir = signum, checkpoint_dir, run_dir


class Checkpointer:
    """Saves and restores the whole training state. Every rank calls every method (each contains collectives)."""

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        cfg: CheckpointConfig,
        rank_local: dict[str, torch.nn.Module] | None = None,
        sharded: dict[str, torch.nn.Module] | None = None,
    ):
        """`rank_local`: modules whose buffers each rank keeps for itself, saved and restored per rank. accelerate's
        save_state writes registered objects from the main process only; an EMA's BatchNorm statistics average each
        rank's own batches until the epoch-end sync, so the other ranks' would come back as rank 0's.
        `sharded`: FSDP2 modules outside `prepare` (the EMA), saved as `{name}_fsdp/` with every rank writing its
        shards (torch.distributed.checkpoint), as accelerate saves the model."""
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.rank_local = rank_local or {}
        self.sharded = sharded or {}
        self.signum = 0  # set by the SIGTERM/SIGINT handler
        self._previous_handlers: dict = {}

    # -- signals: finish the step, save, exit ----------------------------------------------------------------------
    def __enter__(self) -> Checkpointer:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        if exc_type is Stopped:
            self.accelerator.end_training()  # close the trackers cleanly; --resume continues the run

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:  # the second Ctrl-C: leave now, the last
            os._exit(128 + signum)  # complete checkpoint stays
        # A repeated SIGTERM asks the same: under SLURM a rank gets one from the scheduler and one from its launcher.
        self.signum = self.signum or signum

    def check_step(self, nonfinite: torch.Tensor, step: int, skip_nonfinite: bool) -> tuple[bool, bool]:
        """At each optimizer step, before the update: all ranks agree on (skip this update, stop after it).

        A NaN loss on one rank poisons every rank's gradients through the all-reduce, and a signal may reach the
        ranks at different steps: deciding alone would desynchronise them.
        """
        stop = torch.tensor(float(self.signum > 0), device=nonfinite.device)
        flags = torch.stack([nonfinite.clamp(max=1).float(), stop])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")  # Collective: every rank, every optimizer step.
        bad, stop = (bool(v > 0) for v in flags.tolist())
        if bad and not skip_nonfinite:
            latest = checkpoint_dirs(self.run_dir)
            kept = f"the last good checkpoint is {latest[-1]}" if latest else "no checkpoint was saved yet"
            raise UserError(
                f"non-finite loss at step {step}; {kept}; lower --lr, set --clip-grad, or pass --skip-nonfinite"
            )
        return bad, stop

    def stop_requested(self) -> bool:
        """Whether any rank got a signal. Collective when there are several processes."""
        flag = torch.tensor(float(self.signum > 0), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")  # Collective: every rank calls it.
        return bool(flag.item() > 0)

    def stop(self, state: TrainState, loss_sum: torch.Tensor, seen: torch.Tensor) -> None:
        """Save and raise Stopped on every rank (they all saw the same agreed flag)."""
        path = self.save(state, loss_sum, seen)
        signum = self.signum or signal.SIGTERM  # another rank got it: exit as if we had too
        raise Stopped(signum, path, self.run_dir)

    def end_epoch(self, state: TrainState, final: bool) -> None:
        """The epoch-end save; then all ranks stop together if any of them got a signal meanwhile (unless this was
        the last epoch: the run is complete, it finishes normally)."""
        path = self.save(state)
        if not final and self.stop_requested():
            raise Stopped(self.signum or signal.SIGTERM, path, self.run_dir)

    def due(self, step: int, end_of_epoch: bool) -> bool:
        """A periodic mid-epoch save; the last step of an epoch is saved by the epoch-end save instead."""
        return self.cfg.checkpoint_every > 0 and step % self.cfg.checkpoint_every == 0 and not end_of_epoch

    # -- save --------------------------------------------------------------------------------------------------------
    def save(self, state: TrainState, loss_sum: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> Path:
        """Every rank calls this. Writes a temporary folder, then renames it: a checkpoint is complete or absent."""
        accelerator = self.accelerator
        root = self.run_dir / CHECKPOINTS
        final = root / f"step-{state.step}"
        tmp = root / f".tmp-step-{state.step}"
        error = ""
        try:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
                tmp.mkdir(parents=True)
        except OSError as e:
            error = f"{e.strerror}: {e.filename}"
        self._agree(error, tmp)
        try:
            # Collective: every rank writes its RNG states, the main process the model/optimizer/scheduler files
            # and any objects registered with accelerator.register_for_checkpointing (EMA, ...).
            accelerator.save_state(str(tmp))
            rank_state = dict(vars(state), num_processes=accelerator.num_processes)
            if loss_sum is not None:
                rank_state.update(loss_sum=float(loss_sum.item()), seen=float(seen.item()))
            (tmp / STATE_FILE.format(rank=accelerator.process_index)).write_text(json.dumps(rank_state))
            self._save_sharded(tmp)  # Collective: every rank writes its shards
            if self.rank_local:
                from safetensors.torch import save_file

                buffers = {
                    f"{name}.{key}": buffer.detach().cpu().contiguous()
                    for name, module in self.rank_local.items()
                    for key, buffer in module.named_buffers()
                }
                save_file(buffers, str(tmp / BUFFERS_FILE.format(rank=accelerator.process_index)))
        except (OSError, RuntimeError) as e:  # disk full, unwritable; torch reports some as RuntimeError
            error = str(e).split("\n")[0]
        self._agree(error, tmp)
        if accelerator.is_main_process:
            match_umask(tmp)  # every rank has written its files (the collective above); model.safetensors is 0600
            self._publish(tmp, final)
        # Collective: nobody goes on (or exits) before the checkpoint is in place.
        accelerator.wait_for_everyone()
        return final

    def _agree(self, error: str, tmp: Path) -> None:
        """All ranks learn whether any rank failed to write, and all raise together instead of hanging."""
        failed = torch.tensor(float(bool(error)), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            failed = self.accelerator.reduce(failed, reduction="sum")  # Collective: every rank calls it.
        if failed.item() > 0:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            latest = checkpoint_dirs(self.run_dir)
            kept = f"{latest[-1]} is intact" if latest else "no earlier checkpoint exists"
            raise UserError(
                f"cannot write checkpoint {tmp.parent} ({error or 'failed on another process'}); {kept}; "
                "free disk space or fix the folder's permissions, then resume with --resume"
            )

    def _publish(self, tmp: Path, final: Path) -> None:
        """Main process only: rename into place, then drop the oldest beyond --keep-checkpoints."""
        if final.exists():  # the same step saved before a crash and an earlier resume point
            final.rename(final.with_name(f".old-{final.name}"))
            shutil.rmtree(final.with_name(f".old-{final.name}"))
        tmp.rename(final)
        for old in checkpoint_dirs(self.run_dir)[: -self.cfg.keep_checkpoints]:
            # Renamed first (atomic), so a kill mid-delete never leaves a torn folder that looks complete.
            doomed = old.with_name(f".old-{old.name}")
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for leftover in (self.run_dir / CHECKPOINTS).glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # -- load --------------------------------------------------------------------------------------------------------
    def restore(self, epochs: int) -> TrainState:
        """Every rank calls this after everything stateful is prepared or registered: loads the newest complete
        checkpoint safely and returns the loop state. `epochs`: the run's epoch count."""
        found = checkpoint_dirs(self.run_dir)
        if not found:
            raise UserError(
                f"--resume {self.run_dir}: no complete checkpoint in {self.run_dir / CHECKPOINTS}; "
                "the run stopped before its first save, start it again without --resume"
            )
        path = found[-1]
        rank_file = path / STATE_FILE.format(rank=self.accelerator.process_index)
        try:
            state = TrainState(**json.loads(rank_file.read_text()))
        except (OSError, ValueError, TypeError) as e:
            damaged = f"--resume: checkpoint {path} is damaged ({type(e).__name__})"
            raise UserError(f"{damaged}; {_delete_hint(found)}") from e
        if state.num_processes != self.accelerator.num_processes:
            raise UserError(
                f"--resume: the run trained with {state.num_processes} process(es), this launch has "
                f"{self.accelerator.num_processes}; relaunch with {state.num_processes} (the checkpoint holds "
                "each process's random state and data position)"
            )
        if state.epoch >= epochs:
            raise UserError(f"--resume {self.run_dir}: the run already finished its {epochs} epochs; nothing to resume")
        check_safe(path, hint=_delete_hint(found))
        try:
            with _custom_states_weights_only():
                self.accelerator.load_state(str(path))
            self._restore_sharded(path)
            self._restore_rank_local(path)
        except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
            raise UserError(
                f"--resume: checkpoint {path} does not fit this run or is damaged ({type(e).__name__}: {e})".split(
                    "\n"
                )[0]
                + f"; {_delete_hint(found)}"
            ) from e
        return state

    def _save_sharded(self, tmp: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        for name, module in self.sharded.items():
            # Collective: every rank writes its shards.
            dcp.save(get_model_state_dict(module), checkpoint_id=str(tmp / f"{name}_fsdp"))

    def _restore_sharded(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        for name, module in self.sharded.items():
            state = get_model_state_dict(module)
            # Collective: every rank reads its shards (checked as plain data by check_safe before).
            dcp.load(state, checkpoint_id=str(path / f"{name}_fsdp"))
            set_model_state_dict(module, state)

    def _restore_rank_local(self, path: Path) -> None:
        if not self.rank_local:
            return
        from safetensors.torch import load_file

        saved = load_file(str(path / BUFFERS_FILE.format(rank=self.accelerator.process_index)))
        with torch.no_grad():
            for name, module in self.rank_local.items():
                for key, buffer in module.named_buffers():
                    buffer.copy_(saved[f"{name}.{key}"])


def _delete_hint(found: list[Path]) -> str:
    if len(found) > 1:
        return f"delete it to resume from {found[-2]}"
    return "start the run again without --resume"


def check_safe(path: Path, hint: str = "") -> None:
    """Load every pickle-format file of a checkpoint as plain data (torch.load weights_only=True with accelerate's
    numpy allow-list) before accelerate loads it: a payload that would run code is refused, never executed, and a
    truncated file is reported here instead of being skipped (accelerate ignores unreadable RNG states silently)."""
    from accelerate.utils import load

    for metadata in sorted(Path(path).glob("*/.metadata")):  # sharded (FSDP) state: torch.distributed.checkpoint
        try:
            check_distcp(metadata.parent)
        except Exception as e:
            raise UserError(f"--resume: {metadata.parent} is unreadable or unsafe ({type(e).__name__}); {hint}") from e
    for file in sorted(Path(path).iterdir()):
        if file.suffix not in (".bin", ".pkl", ".pt", ".pth"):
            continue  # safetensors and JSON cannot carry code
        try:
            load(file, map_location="cpu")
        except Exception as e:  # UnpicklingError for forbidden globals; EOFError, RuntimeError for torn files
            unsafe = "weights only" in str(e).lower() or "unsupported global" in str(e).lower()
            what = (
                "holds pickled objects that could run code: refused"
                if unsafe
                else f"is unreadable ({type(e).__name__})"
            )
            raise UserError(f"--resume: {file} {what}; {hint}".rstrip("; ")) from e


class _DistcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint `.metadata` file (which torch reads with plain pickle) allowing
    only the plain-data classes such a file holds."""

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.filesystem as dcp_filesystem

        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo")
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath"))
            or (module == "collections" and name == "OrderedDict")
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not plain checkpoint metadata")
        if module == "torch.distributed.checkpoint.filesystem":
            return dcp_filesystem._StorageInfo
        return super().find_class(module, name)


def check_distcp(folder: Path) -> None:
    """Check a torch.distributed.checkpoint folder as plain data before torch loads it: torch reads its `.metadata`
    with plain pickle and its non-tensor entries (e.g. optimizer hyperparameters) with torch.load(weights_only=False).
    Here the metadata goes through an allow-list and every such entry through torch.load(weights_only=True)."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with open(folder / ".metadata", "rb") as f:
        metadata = _DistcpMetadataUnpickler(f).load()
    for index, info in (metadata.storage_data or {}).items():
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(folder / info.relative_path, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), map_location="cpu", weights_only=True)


@contextmanager
def _custom_states_weights_only():
    """accelerate.load_state reads registered objects (EMA, timm schedulers, ...) with weights_only=False, i.e. full
    pickle. Route them through accelerate's weights-only `load` for the duration of our load_state call."""
    import accelerate.accelerator as accelerator_module
    from accelerate.utils import load

    original = accelerator_module.load_custom_state

    def load_custom_state(obj, path: str, index: int = 0) -> None:
        obj.load_state_dict(load(f"{path}/custom_checkpoint_{index}.pkl", map_location="cpu"))

    accelerator_module.load_custom_state = load_custom_state
    try:
        yield
    finally:
        accelerator_module.load_custom_state = original
