"""`trainer data audit`: K folds of the run's own training, then cleanlab on their out-of-sample outputs.

Every rank runs `audit()` as it runs a training (plainly, under accelerate launch or torchrun): the folds train and
predict on every rank; the main process alone puts them together and writes the findings.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from trainer import data
from trainer.audit import folds as kfold
from trainer.audit.findings import Findings
from trainer.audit.issues import cleanlab_module, combine, find_issues
from trainer.config import Config, RunConfig, UserError
from trainer.data.splits import labels_of
from trainer.report.mistakes import file_names
from trainer.report.reporter import Reporter
from trainer.run.layout import CONFIG_FILE
from trainer.run.rundirs import RunFolder, create_run_dir, release_run_dir
from trainer.run.writes import atomic_file, disk_errors
from trainer.train.launch import build_accelerator

AUDIT_PROJECT = "runs/audit"  # --project when it is left at train's default
DEFAULT_FOLDS = 5  # cleanlab's recommendation


def audit_config(cfg: Config) -> Config:
    """The audit's own --project (runs/audit unless given: its folder, and its wandb project `audit`)."""
    if cfg.run.project != RunConfig.project:
        return cfg
    return replace(cfg, run=replace(cfg.run, project=AUDIT_PROJECT))


def stored_folds(run_dir: Path) -> int:
    """The fold count an audit folder was started with (its config.yaml's `audit:` record)."""
    try:
        record = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
        return int(record["audit"]["folds"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        raise UserError(f"--resume {run_dir}: not a trainer data audit folder (no audit: in config.yaml)") from None


def audit(cfg: Config, folds: int = DEFAULT_FOLDS, resume_dir: Path | None = None) -> dict:
    """Audit the data of `cfg` with `folds` folds in a new run folder, or continue the audit in `resume_dir`.
    Returns the summary's numbers. Every rank calls this."""
    if folds < 2:
        raise UserError(f"--folds {folds}: cross-validation needs at least 2 folds (5 is usual)")
    cleanlab_module()  # a missing extra is one line before minutes of training
    if cfg.data.streaming:
        raise UserError("trainer data audit reads every image several times; drop --streaming")
    accelerator = build_accelerator(cfg, resume_dir)
    reporter = Reporter(accelerator)
    backend = data.choose_backend(cfg.data, accelerator.device.type)
    loaded = data.load_data(accelerator, cfg.data)  # Collective: every rank
    info = loaded.info
    if info.multilabel:
        raise UserError("trainer data audit reads single-label data (one class per image); this data is multi-label")
    train_labels = labels_of(loaded.train)
    plan = kfold.plan_folds(train_labels, folds, cfg.data.split_seed, info.class_names)
    cfg = audit_config(cfg)
    folder = RunFolder(cfg.run.project, cfg.run.name, cfg.run.exist_ok)
    # Collective: the main process picks (or takes) the folder and locks it; every rank learns its name.
    run_dir = create_run_dir(accelerator, folder, weights_dir=False, existing=resume_dir)
    if resume_dir is None and (run_dir / kfold.FOLDS_DIR).exists():  # --exist-ok on an audit: its folds are not ours
        raise UserError(
            f"{run_dir} holds an audit already; continue it with trainer data audit --resume {run_dir}, or choose "
            "another --name"
        )
    record = {**cfg.to_dict(), "audit": {"folds": folds}}
    if accelerator.is_main_process and resume_dir is None:
        with atomic_file(run_dir / CONFIG_FILE) as tmp, open(tmp, "w") as f:
            yaml.safe_dump(record, f, sort_keys=False)
    reporter.print(
        f"audit of {info.source}: {folds} folds of {cfg.model.model}, {cfg.train.epochs} epoch(s) each, "
        f"on {info.train_size} train images (+ {info.val_size} val images predicted), "
        f"{accelerator.num_processes} process(es); in {run_dir}"
    )
    outputs = []
    for k in range(folds):
        where = kfold.fold_dir(run_dir, k)
        if not (where / kfold.OUTPUTS).is_file():
            reporter.print(
                f"audit fold {k + 1}/{folds}: training on {len(plan.kept(k))} images, holding out {len(plan.held(k))}"
            )
            done = kfold.train_fold(cfg, run_dir, plan, k)
            reporter.print(f"audit fold {k + 1}/{folds} {done}; predicting every image with it")
            found = kfold.fold_outputs(accelerator, cfg, loaded, backend, where)  # Collective inside
            if accelerator.is_main_process:
                kfold.save_outputs(found, where)
            # Collective: no rank reads the fold as done before the main process wrote it.
            accelerator.wait_for_everyone()
        else:
            reporter.print(f"audit fold {k + 1}/{folds} done before: {where / kfold.OUTPUTS}")
        if accelerator.is_main_process:
            outputs.append(kfold.load_outputs(where))
    numbers: dict = {}
    failed = None
    if accelerator.is_main_process:
        try:
            with disk_errors(run_dir, "the folds' outputs are kept: --resume writes the findings again"):
                numbers = report_findings(run_dir, cfg, record, plan, outputs, loaded, reporter)
        except UserError as e:  # raised after the ranks met below, so none of them waits for this one
            failed = e
    # Collective: leave together, after the main process wrote the findings.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    release_run_dir(run_dir)
    if failed is not None:
        raise failed
    return numbers


def report_findings(run_dir: Path, cfg: Config, record: dict, plan, outputs: list, loaded, reporter) -> dict:
    """Main process: the folds put together, cleanlab, the files, the summary printed, the wandb tables."""
    train_labels = labels_of(loaded.train)
    combined = combine(plan.fold_of, outputs, train_labels, labels_of(loaded.val))
    files = {"train": file_names(loaded.train), "val": file_names(loaded.val)}
    findings = Findings(combined, find_issues(combined), files, loaded.splits, loaded.info.class_names)
    lines = findings.write(run_dir, plan.folds)
    print("\n".join(lines), flush=True)
    if cfg.run.trackers():
        reporter.start_trackers(run_dir, record, cfg.run)
        reporter.log_tables(findings.tables())
    return findings.summary(plan.folds)
