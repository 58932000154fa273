"""`trainer val`: evaluate trained weights again, through the same `loop.evaluate` as training.

Run plainly or under `accelerate launch` / `torchrun`: every rank evaluates its shard, `loop.evaluate` gathers
the whole set once in dataset order, so any process count gives the numbers of one process.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import partial
from pathlib import Path

from accelerate.utils import DistributedType

from trainer import data
from trainer.config import Config, DataConfig, RunConfig, UserError
from trainer.report import evaluation, heatmaps, mistakes
from trainer.report.metrics import MultiLabelPredictions, multilabel_rows
from trainer.run.layout import CONFIG_FILE
from trainer.run.rundirs import RunFolder, create_run_dir
from trainer.run.writes import atomic_file
from trainer.train.launch import build_accelerator
from trainer.train.loop import evaluate
from trainer.use.inference import check_classes, data_config_for, load_model, read_weights, recorded_dataset, run_dir_of
from trainer.use.tta import with_tta

VAL_FOLDER = RunFolder("runs/val")  # --project runs/val --name exp


def validate(
    weights: str,
    *,
    data_name: str | None = None,
    split: str = "val",
    batch_size: int = 256,
    workers: int = -1,
    loader: str = "auto",
    folder: RunFolder = VAL_FOLDER,
    tta: str | None = None,
    cam: str = "",
) -> dict:
    """Evaluate `weights` on `split` of their run's data (or `data_name`); print the metrics and the per-class
    table; write per_class.csv, confusion_matrix.png, the top losses, most_confused.csv and metrics.json to a run
    folder (`cam`: a grad-cam method, the top losses' heatmaps too). Every rank calls this."""
    trained = read_weights(weights)
    data_cfg = data_config_for(trained, data_name)
    if data_cfg is None:
        raise UserError(
            f"--weights {weights}: no config.yaml of its run (RUN/weights/{trained.path.name} -> RUN/config.yaml) "
            "to say which data it was trained on; pass --data"
        )
    # Evaluation augments nothing: a run trained with --auto-augment evaluates through DALI too.
    data_cfg = replace(data_cfg, workers=workers, loader=loader, auto_augment="")
    accelerator = build_accelerator(Config(data=data_cfg, run=RunConfig(tracker="none")))
    backend = data.choose_backend(data_cfg, accelerator.device.type)
    dataset = data.load_data(accelerator, data_cfg)  # Collective: every rank
    info = dataset.info
    check_classes(trained, info.class_names, data_cfg.data)
    if info.multilabel != trained.multilabel:
        raise UserError(
            f"--data {data_cfg.data} is {info.task} but {trained.path.name} was trained {trained.task().kind}; "
            "pass the data it was trained on"
        )
    if split not in dataset.splits:
        raise UserError(f"--split {split}: {info.source} has splits {', '.join(dataset.splits)}")
    if not hasattr(dataset.splits[split], "__len__"):  # a --streaming run's training split is a stream
        raise UserError(f"--split {split}: {info.source} streams its {split} split; evaluate --split val")
    warning = moved_hold_out(trained, info, data_name, split)
    world = accelerator.num_processes
    spec = data.loader_spec(data_cfg, backend, trained.pre)
    batches = data.eval_loader(accelerator, dataset.splits[split], spec, math.ceil(batch_size / world))  # sharded
    if cam:  # refused before the evaluation: FSDP shards, or a model no CAM rule fits
        check_cam(accelerator, trained)
    model = accelerator.prepare(with_tta(load_model(trained), tta))  # --tta: averaged logits, see trainer.use.tta
    # Collective (gather_for_metrics inside): every rank gets the whole set's predictions.
    metrics, preds = evaluate(accelerator, model, batches, trained.num_classes, trained.task())
    # Every rank: the main process picks and creates the folder, then broadcasts its name.
    run_dir = create_run_dir(accelerator, folder, weights_dir=False)
    summary = {
        **metrics,
        "images": len(preds),
        "weights": str(trained.path),
        "epoch": int(trained.metadata.get("epoch", 0)),
        "data": info.source,
        "split": split,
        "imgsz": trained.pre.imgsz,  # the run's --test-imgsz when it had one (FixRes), else its --imgsz
        "num_processes": world,
        "loader": backend.name,
        "tta": tta or "",
        **({"warning": warning} if warning else {}),
    }
    if accelerator.is_main_process:
        overlays = partial(top_loss_overlays, trained, dataset.splits[split], cam) if cam else None
        write_report(run_dir, summary, preds, trained.class_names, trained.describe(), dataset.splits[split], overlays)
    # Collective: leave together; a rank that tears down while the main process still writes can abort gloo.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def check_cam(accelerator, trained) -> None:
    """--cam: refused in one line under FSDP (the heatmaps need the whole model) or for a model no rule fits."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("--cam needs the whole model and FSDP shards it; run trainer val --cam without FSDP")
    heatmaps.grad_cam_module()
    heatmaps.target_layers(load_model(trained), trained.model_name, trained.pre.imgsz, trained.pre.in_chans)


def top_loss_overlays(trained, split, method: str, found: list) -> list:
    """The top losses' heatmaps (of the predicted class; multi-label: the worst label), in their order. Main process,
    on the plain model (no TTA, not wrapped)."""
    pre = trained.pre
    spec = data.LoaderSpec(data.choose_backend(DataConfig(loader="torch"), "cpu"), pre, 0)
    batch = next(iter(data.eval_loader(None, split.select([m.index for m in found]), spec, len(found))))
    drawer = heatmaps.Heatmaps(load_model(trained), trained.model_name, pre, method)
    try:
        return drawer.overlays(batch.images, [m.target for m in found])
    finally:
        drawer.close()


def moved_hold_out(trained, info, data_name: str | None, split: str) -> str:
    """A warning when `split` is the run's own held-out validation and its data no longer holds what the run split:
    the hold-out is drawn anew from what is there now, so some of its images were trained on. "" otherwise."""
    run_dir = run_dir_of(trained)
    if data_name is not None or split != "val" or run_dir is None:
        return ""
    record = recorded_dataset(run_dir / CONFIG_FILE)
    sizes = (record.get("train_size"), record.get("val_size"))
    recorded = all(isinstance(n, int) for n in sizes) and "held out" in str(record.get("val_split", ""))
    if not recorded or sizes == (info.train_size, info.val_size):
        return ""
    return (
        f"warning: the run held out its validation from {sum(sizes)} images ({sizes[1]} val) and the data now has "
        f"{info.train_size + info.val_size} ({info.val_size} val): the hold-out is drawn anew, so some of these "
        "images were trained on and the metrics read high; evaluate on a fixed val/ folder or split"
    )


def write_report(run_dir: Path, summary: dict, preds, class_names: list[str], model: str, split=None, cam=None):
    """Main process only: the console report and the files of a val run (`split`: the images evaluated, for the top
    losses; `cam`: their heatmaps, see write_mistakes)."""
    multilabel = isinstance(preds, MultiLabelPredictions)
    rows = multilabel_rows(preds, class_names) if multilabel else evaluation.per_class_rows(preds, class_names)
    evaluation.save_per_class_csv(rows, run_dir / "per_class.csv")
    mistakes.write_mistakes(run_dir, preds, class_names, split, cam)
    if multilabel:
        evaluation.save_pr_curves_png(preds, class_names, run_dir / "pr_curve.png")
    else:
        cm = evaluation.confusion_matrix(preds, len(class_names))
        evaluation.save_confusion_matrix_png(cm, class_names, run_dir / "confusion_matrix.png")
        summary["val/ece"] = evaluation.save_reliability_png(preds, run_dir / "reliability.png")
    with atomic_file(run_dir / "metrics.json") as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    if summary.get("warning"):
        print(summary["warning"])
    print(
        f"{model} on {summary['data']} {summary['split']} ({summary['images']} images), "
        f"{summary['num_processes']} process(es), {summary['imgsz']} px"
        + (f", TTA {summary['tta']}" if summary["tta"] else "")
    )
    print(evaluation.format_per_class(rows))
    if multilabel:
        scores = f"mAP {summary['val/map']:.4f}  micro_f1 {summary['val/micro_f1']:.4f}"
        scores += f"  macro_f1 {summary['val/macro_f1']:.4f} (threshold {preds.threshold:g})"
    else:
        scores = f"top1 {summary['val/top1']:.4f}  top5 {summary['val/top5']:.4f}"
        scores += f"  macro_f1 {summary['val/macro_f1']:.4f}  bal_acc {summary['val/balanced_acc']:.4f}"
    print(f"val/loss {summary['val/loss']:.4f}  {scores}. Results saved to {run_dir}", flush=True)
