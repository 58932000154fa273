"""Resumable checkpoints, `{run}/checkpoints/step-N`, complete or absent: the loop's TrainState, the Checkpointer that
saves and restores the whole training state, and Stopped (a signal arrived, the checkpoint is saved).

Each call site says whether every rank or only the main process runs it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from trainer.config import CheckpointConfig, UserError
from trainer.run.finite import nonfinite_names, refuse_nonfinite
from trainer.run.layout import BUFFERS_FILE, CHECKPOINTS, STATE_FILE, STEP_PREFIX, checkpoint_dirs
from trainer.run.manifest import (
    FINGERPRINT_FILE,
    RunShape,
    fingerprint_changes,
    manifest_problem,
    read_fingerprint,
    record_data_change,
    state_problem,
    write_manifest,
)
from trainer.run.peers import ignore_sigterm, lost_peer
from trainer.run.safeload import check_safe, custom_states_weights_only
from trainer.run.weights import match_umask


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
    epochs_since_best: int = 0  # --patience: epochs ended since the best one (trainer.train.stopping)
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
        fingerprint: dict | None = None,
        note: Callable[[str], None] | None = None,
    ):
        """`rank_local`: modules whose buffers each rank keeps for itself, saved and restored per rank. accelerate's
        save_state writes registered objects from the main process only; an EMA's BatchNorm statistics average each
        rank's own batches until the epoch-end sync, so the other ranks' would come back as rank 0's.
        `sharded`: FSDP2 modules outside `prepare` (the EMA), saved as `{name}_fsdp/` with every rank writing its
        shards (torch.distributed.checkpoint), as accelerate saves the model.
        `fingerprint`: the data the run trains on (trainer.data.fingerprint), stored in every checkpoint and compared
        on restore. `note`: prints a line once (the Reporter's print; accelerate's main-process print by default)."""
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.rank_local = rank_local or {}
        self.sharded = sharded or {}
        self.fingerprint = fingerprint
        self.note = note or accelerator.print
        self.resumed = False
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
        if exc is not None and lost_peer(exc):
            ignore_sigterm()  # the launcher's SIGTERM follows at once: this rank says why it fails first
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
            remedies = "lower --lr, set --clip-grad, or pass --skip-nonfinite"
            if self.resumed:  # each changes what the run computes
                remedies = "--resume refuses --lr, --clip-grad and --skip-nonfinite: start a new run that changes them"
            raise UserError(f"non-finite loss at step {step}; {kept}; {remedies}")
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
        latest = checkpoint_dirs(self.run_dir)
        kept = f"{latest[-1]} is intact" if latest else "no earlier checkpoint exists"
        # Collective: every rank checks its own tensors, and all refuse together.
        refuse_nonfinite(accelerator, self._nonfinite(), f"checkpoint {final.name}", state.step, kept)
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
            if self.fingerprint is not None and accelerator.is_main_process:
                (tmp / FINGERPRINT_FILE).write_text(json.dumps(self.fingerprint))
            self._save_sharded(tmp)  # Collective: every rank writes its shards
            if self.rank_local:
                from safetensors.torch import save_file

                buffers = {
                    f"{name}.{key}": buffer.detach().cpu().contiguous()
                    for name, module in self.rank_local.items()
                    for key, buffer in module.named_buffers()
                }
                save_file(buffers, str(tmp / BUFFERS_FILE.format(rank=accelerator.process_index)))
        # Disk full or unwritable: torch says so as RuntimeError, safetensors as SafetensorError. Every rank must
        # reach _agree with its error, or the others wait in its reduce.
        except (OSError, RuntimeError, SafetensorError) as e:
            error = str(e).split("\n")[0]
        self._agree(error, tmp)
        if accelerator.is_main_process:
            write_manifest(tmp, state.step, accelerator.num_processes)  # last: its presence says all is written
            match_umask(tmp)  # every rank has written its files (the collective above); model.safetensors is 0600
            self._publish(tmp, final)
        # Collective: nobody goes on (or exits) before the checkpoint is in place.
        accelerator.wait_for_everyone()
        return final

    def _nonfinite(self) -> list[str]:
        """Names of this rank's non-finite model, optimizer and EMA tensors (its shards under FSDP)."""
        models = self.accelerator._models
        named = [(f"model.{name}", t) for model in models for name, t in model.state_dict(keep_vars=True).items()]
        for optimizer in self.accelerator._optimizers:
            for i, per_param in enumerate(optimizer.optimizer.state.values()):
                named += [
                    (f"optimizer.{i}.{key}", value) for key, value in per_param.items() if hasattr(value, "dtype")
                ]
        for name, module in {**self.rank_local, **self.sharded}.items():
            named += [(f"{name}.{key}", tensor) for key, tensor in module.state_dict(keep_vars=True).items()]
        return nonfinite_names(named)

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
    def restore(self, epochs: int, shape: RunShape | None = None) -> TrainState:
        """Every rank calls this after everything stateful is prepared or registered: loads the newest complete
        checkpoint safely and returns the loop state. `epochs`: the run's epoch count; `shape`: what the state must
        fit (this data's batches per epoch). An incomplete or damaged newest checkpoint is skipped, with one line,
        for the newest complete one; every rank decides from the same files."""
        self.resumed = True
        shape = shape or RunShape(epochs)
        found = checkpoint_dirs(self.run_dir)
        if not found:
            raise UserError(
                f"--resume {self.run_dir}: no complete checkpoint in {self.run_dir / CHECKPOINTS}; "
                "the run stopped before its first save, start it again without --resume"
            )
        skipped: list[str] = []
        for path in reversed(found):
            problem = self._problem(path, shape)
            if isinstance(problem, TrainState):
                break
            skipped.append(f"{path.name} ({problem})")
        else:
            raise UserError(
                f"--resume: no usable checkpoint in {self.run_dir / CHECKPOINTS}: {'; '.join(skipped)}; "
                "start the run again without --resume"
            )
        state = problem
        self._agree_on(path)
        if skipped:
            self.note(f"--resume: skipped checkpoint {'; '.join(skipped)}; resuming from {path.name}")
        try:
            with custom_states_weights_only():
                self.accelerator.load_state(str(path))
            self._restore_sharded(path)
            self._restore_rank_local(path)
        except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
            reason = f"{type(e).__name__}: {e}".split("\n")[0]
            raise UserError(
                f"--resume: checkpoint {path} does not load into this run ({reason}); its files are complete and "
                "its data matches: a changed trainer or library version? start a new run without --resume"
            ) from e
        return state

    def _problem(self, path: Path, shape: RunShape) -> TrainState | str:
        """The checkpoint's loop state, or why it cannot be used (incomplete, damaged, values that do not fit the run).
        Refuses (UserError) what no older checkpoint would fix: another process count, a finished run, new data."""
        problem = manifest_problem(path)
        if problem:
            return problem
        states = []
        for rank in range(max(self.accelerator.num_processes, 1)):
            try:
                states.append(TrainState(**json.loads((path / STATE_FILE.format(rank=rank)).read_text())))
            except (OSError, ValueError, TypeError) as e:
                return f"{STATE_FILE.format(rank=rank)} damaged: {type(e).__name__}"
            if states[-1].num_processes != self.accelerator.num_processes:
                raise UserError(
                    f"--resume: the run trained with {states[-1].num_processes} process(es), this launch has "
                    f"{self.accelerator.num_processes}; relaunch with {states[-1].num_processes} (the checkpoint holds "
                    "each process's random state and data position)"
                )
        state = states[self.accelerator.process_index]
        if states[0].epoch >= shape.epochs:
            raise UserError(
                f"--resume {self.run_dir}: the run already finished its {shape.epochs} epochs; nothing to resume"
            )
        same_data = self._check_data(path, state)
        problem = state_problem(states, shape, check_step=same_data)
        if problem:
            return problem
        try:
            check_safe(path)
        except UserError as e:
            return str(e).removeprefix("--resume: ").replace(str(path) + "/", "")
        return state

    def _check_data(self, path: Path, state: TrainState) -> bool:
        """Refuse a resume on data that changed since the checkpoint, unless --data-changed ok; True: the same data."""
        if self.fingerprint is None:
            return True
        stored = read_fingerprint(path)
        if stored is None:
            self.note(f"--resume: {path.name} has no data fingerprint (an older trainer wrote it): data not checked")
            return True
        changes = fingerprint_changes(stored, self.fingerprint)
        if not changes:
            return True
        what = "; ".join(changes)
        if len(stored.get("classes", [])) != len(self.fingerprint["classes"]):
            raise UserError(
                f"--resume: the data changed since {path.name} ({what}); the model was built for "
                f"{len(stored['classes'])} classes, so it cannot continue: start a new run without --resume"
            )
        if self.cfg.data_changed != "ok":
            raise UserError(
                f"--resume: the data changed since {path.name} ({what}); start a new run without --resume, or "
                "continue on this data on purpose with --resume --data-changed ok"
            )
        self.note(f"--data-changed ok: resuming {path.name} on changed data ({what})")
        if self.accelerator.is_main_process:
            record_data_change(self.run_dir, state.step, changes)
        return False

    def _agree_on(self, path: Path) -> None:
        """Every rank chose the same checkpoint (they read the same files; a shared folder seen differently would
        desynchronise them silently)."""
        if self.accelerator.num_processes == 1:
            return
        step = torch.tensor([int(path.name.removeprefix(STEP_PREFIX))], device=self.accelerator.device)
        steps = self.accelerator.gather(step)  # Collective: every rank calls it.
        if len(set(steps.tolist())) > 1:
            raise UserError(
                f"--resume: the processes chose different checkpoints (steps {sorted(set(steps.tolist()))}): "
                f"{self.run_dir} is not the same folder on every machine; resume from a shared folder"
            )

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
