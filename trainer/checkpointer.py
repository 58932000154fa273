"""Resumable checkpoints, `{run}/checkpoints/step-N`, complete or absent: the loop's TrainState, the Checkpointer that
saves and restores the whole training state, and Stopped (a signal arrived, the checkpoint is saved).

Each call site says whether every rank or only the main process runs it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.config import CheckpointConfig, UserError
from trainer.files import BUFFERS_FILE, CHECKPOINTS, STATE_FILE, STEP_PREFIX, checkpoint_dirs
from trainer.safeload import check_safe, custom_states_weights_only
from trainer.weights import match_umask


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
    best_value: float | None = None  # of best_metric (--best-metric); None: no epoch evaluated yet
    best_metric: str = ""  # the results.csv column `best_value` is of, e.g. val/top1, val/map
    skipped_steps: int = 0  # non-finite steps skipped with --skip-nonfinite
    num_processes: int = 1
    epochs_since_best: int = 0  # --patience: epochs ended since the best one (trainer.stopping)
    stopped_epoch: int = 0  # --patience: the epoch the run stopped early at; 0: it did not


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
        final = root / f"{STEP_PREFIX}{state.step}"
        tmp = root / f".tmp-{STEP_PREFIX}{state.step}"
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
            with custom_states_weights_only():
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
