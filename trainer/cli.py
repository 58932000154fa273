"""Command line: argv (+ --config YAML) -> Config -> a command (train, lr-find, val, predict, export, benchmark,
data).
With trainer/flags.py (every command's flags), the only modules that know argparse.

Precedence: dataclass defaults < --config YAML < flags given on the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer import __version__
from trainer.config import Config, RunConfig, UserError, build_config
from trainer.flags import (
    Parser,
    add_config_flags,
    add_data_commands,
    add_lr_find,
    add_use_commands,
    bare_tta,
    given_values,
)
from trainer.run.faults import error_line, leave_process_group, plain
from trainer.run.peers import lost_peer
from trainer.run.resume import AUTO, LATEST, auto_resume, find_run_dir, finished, resume_config, stopped_early
from trainer.run.rundirs import RunFolder, release_run_dirs


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = Parser(prog="trainer", description="Train timm image classifiers with Accelerate.")
    parser.add_argument("--version", action="version", version=f"trainer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = commands.add_parser(
        "train",
        help="train a classifier",
        description="Train a timm classifier. Run plainly, under `accelerate launch`, or under `torchrun`.",
    )
    train.add_argument(
        "--config",
        metavar="YAML",
        help="run config (sections: data, model, optim, train, distill, checkpoint, run); flags override it",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const=LATEST,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (e.g. runs/train/exp) from its newest checkpoint to its original epoch "
        "count; alone: the most recent run under --project ({project}/{name} with --name); `auto`: continue "
        "{project}/{name} if it has a checkpoint, else start it there (the same command for every restart)",
    )
    dests = add_config_flags(train)
    add_lr_find(commands)
    add_use_commands(commands)
    add_data_commands(commands)
    return parser, dests


def run_data_command(args: argparse.Namespace, dests: dict) -> None:
    """`trainer data convert`: prints what it wrote; `trainer data audit`: the audit (trainer.audit.command)."""
    if args.data_command == "audit":
        run_audit(args, dests)
        return
    _stay_offline(not args.allow_download, wandb=False)
    from trainer.data.convert import convert

    counts = convert(args.src, args.dst, args.format, args.shard_size, data_config=args.data_config)
    written = ", ".join(f"{split} {n}" for split, n in counts.items())
    print(f"trainer: wrote {args.format} shards to {args.dst} ({written} samples)", flush=True)


def run_audit(args: argparse.Namespace, dests: dict) -> None:
    """`trainer data audit`: a new audit, or `--resume RUN_DIR` with its stored recipe and fold count."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {args.resume}: not an audit folder (no config.yaml); give e.g. runs/audit/exp")
        cfg = resume_config(run_dir, given_values(args, dests))
    else:
        cfg, run_dir = resolve_config(args, dests), None
    _stay_offline(not cfg.run.allow_download, "wandb" in cfg.run.trackers())
    from trainer.audit.command import DEFAULT_FOLDS, audit, stored_folds
    from trainer.run.checkpointer import Stopped

    folds = args.folds or DEFAULT_FOLDS
    if run_dir is not None:
        folds = stored_folds(run_dir)
        if args.folds and args.folds != folds:
            raise UserError(f"--resume: --folds {args.folds} differs from the audit's {folds}; drop --folds")
    try:
        audit(cfg, folds, run_dir)
    except Stopped as e:  # raised in a fold: {audit}/folds/foldK
        raise AuditStopped(str(e), e.signum, e.run_dir.parent.parent) from e


class AuditStopped(Exception):
    """A signal stopped an audit's fold after its checkpoint: the audit continues with --resume."""

    def __init__(self, message: str, signum: int, run_dir: Path):
        super().__init__(message)
        self.signum, self.run_dir = signum, run_dir


def resolve_config(args: argparse.Namespace, dests: dict) -> Config:
    """Merge defaults, the YAML file and the flags given, then validate."""
    return build_config(given_values(args, dests))


def resolve_resume(args: argparse.Namespace, dests: dict) -> tuple[Config, Path | None]:
    """--resume: the run folder, and its stored config with the harmless settings given now. `--resume auto`
    finding no checkpoint: the config given, and None (a new run)."""
    values = given_values(args, dests)
    if args.resume == AUTO:
        return auto_resume(values)
    run = values.get("run") or {}
    run_dir = find_run_dir(args.resume, run.get("project", RunConfig.project), run.get("name"))
    return resume_config(run_dir, values), run_dir


def _stay_offline(offline: bool, wandb: bool) -> None:
    if offline:
        # Offline-first: hub libraries read these at import, so set them before anything imports them.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not wandb:
        # timm.data imports timm.utils, which imports wandb "in case" (0.7 s here): keep an unused tracker out.
        sys.modules.setdefault("wandb", None)  # type: ignore[arg-type]


def run_use_command(args: argparse.Namespace) -> None:
    """val, predict, export or benchmark; heavy imports only now, so `trainer train` never loads onnx or openvino."""
    _stay_offline(not getattr(args, "push_to_hub", None), wandb=getattr(args, "tracker", "none") == "wandb")
    if args.command == "val":
        from trainer.use.val import validate

        validate(
            args.weights,
            data_name=args.data,
            split=args.split,
            batch_size=args.batch_size,
            workers=args.workers,
            loader=args.loader,
            folder=RunFolder(args.project, args.name, args.exist_ok),
            tta=args.tta,
            cam=args.cam_method if args.cam else "",
        )
    elif args.command == "predict":
        from trainer.use.predict import predict

        predict(
            args.weights,
            args.sources,
            batch_size=args.batch_size,
            topk=args.topk,
            workers=args.workers,
            loader=args.loader,
            folder=RunFolder(args.project, args.name, args.exist_ok),
            write_json=args.json,
            threshold=args.threshold,
            tta=args.tta,
            cam=args.cam_method if args.cam else "",
        )
    elif args.command == "export":
        from trainer.use.export.command import export

        options = {k: getattr(args, k) for k in ("output", "check_images", "push_to_hub", "half", "int8", "bf16")}
        export(args.weights, args.format, data_name=args.data, calib_images=args.calib_images, **options)
    else:
        from trainer.use.export.benchmark import benchmark

        options = {k: getattr(args, k) for k in ("check_images", "batch_size", "rounds", "calib_images", "tracker")}
        benchmark(args.weights, args.formats, args.data, RunFolder(args.project, args.name, args.exist_ok), **options)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = any(a == "--debug" or a.lower() in ("--debug=true", "--debug=1", "--debug=yes") for a in argv)
    resume_dir = None
    try:
        parser, dests = build_parser()
        args = parser.parse_args(bare_tta(argv))
        if args.command == "data":
            try:
                run_data_command(args, dests)
            except AuditStopped as e:
                _say(f"trainer: audit {e}; continue with: trainer data audit --resume {e.run_dir}")
                return 128 + e.signum
            return 0
        if args.command == "lr-find":
            cfg = resolve_config(args, dests)
            _stay_offline(not cfg.run.allow_download, wandb=False)
            from trainer.train.lr_find import lr_find

            lr_find(cfg, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
            return 0
        if args.command != "train":
            run_use_command(args)
            return 0
        cfg, resume_dir = resolve_resume(args, dests) if args.resume else (resolve_config(args, dests), None)
        if args.resume == AUTO and resume_dir is not None and finished(resume_dir, cfg.train.epochs):
            _say(f"trainer: {resume_dir} already finished its {cfg.train.epochs} epochs; nothing to do")
            return 0
        stopped = stopped_early(resume_dir) if resume_dir is not None else 0
        if stopped:  # refused before anything is loaded or rewritten (its plots, results.csv)
            raise UserError(
                f"--resume {resume_dir}: the run stopped early at epoch {stopped} (--patience {cfg.train.patience}); "
                "nothing to resume: its best weights are in weights/; start a new run to train further"
            )
        _stay_offline(not cfg.run.allow_download, "wandb" in cfg.run.trackers())
        from trainer.run.checkpointer import Stopped
        from trainer.train.engine import train

        try:
            train(cfg, resume_dir)
        except Stopped as e:
            _say(f"trainer: {e}; continue with: trainer train --resume {e.run_dir}")
            return 128 + e.signum
    except UserError as e:
        if debug:
            raise
        _say(f"trainer: error: {plain(str(e))}")
        leave_process_group()
        return 2
    except Exception as e:  # environment errors (disk full, a damaged file, ...) get one line; others are bugs
        line = None if debug else error_line(e, resume_dir)
        if line is None:
            raise
        _say(f"trainer: error: {line}", every_rank=lost_peer(e))  # a lost peer: each survivor says what it saw
        return 2
    except KeyboardInterrupt:
        print("trainer: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        release_run_dirs()  # the command is over (main may be called in-process: tests, sweeps)
    return 0


def _say(line: str, every_rank: bool = False) -> None:
    # Every rank fails or stops alike: one line per machine is enough (`every_rank`: when what each saw differs).
    if every_rank or os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
