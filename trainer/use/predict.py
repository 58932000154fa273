"""`trainer predict`: top-k classes with probabilities for image files, folders and globs, batched; for multi-label
weights, every label whose sigmoid is above the weights' threshold (or --threshold), with its probability.

Images come through the data pipeline's `files_loader`, preprocessed exactly as in validation by either backend. A
file that cannot be read is listed with the reason and skipped; the run goes on.
"""

from __future__ import annotations

import csv
import glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer import data
from trainer.config import DataConfig, UserError
from trainer.data.decode import IMAGE_EXTENSIONS
from trainer.report import heatmaps
from trainer.run.rundirs import RunFolder, make_run_dir
from trainer.run.writes import atomic_file
from trainer.use.inference import load_model, read_weights
from trainer.use.tta import with_tta

PRINTED_ROWS = 30  # the table on screen; the files hold every image

PREDICT_FOLDER = RunFolder("runs/predict")  # --project runs/predict --name exp


@dataclass
class Prediction:
    path: str
    classes: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str = ""


def find_images(sources: list[str]) -> tuple[list[Path], list[Prediction]]:
    """Image files from files, folders (recursively) and glob patterns, in order, each once; sources that match
    nothing come back as failed predictions."""
    found: list[Path] = []
    missing: list[Prediction] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            found.append(path)  # named explicitly: try it whatever its suffix
        elif path.is_dir():
            found += _images_under(path)
        elif any(c in source for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(source, recursive=True))]
            found += [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
            for folder in (m for m in matches if m.is_dir()):
                found += _images_under(folder)
            if not matches:
                missing.append(Prediction(source, error="no file matches this pattern"))
        else:
            missing.append(Prediction(source, error="no such file or folder"))
    return list(dict.fromkeys(found)), missing


def _escaped(path: Path) -> str:
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@torch.no_grad()
def predict(
    weights: str,
    sources: list[str],
    *,
    batch_size: int = 32,
    topk: int = 5,
    workers: int = -1,
    loader: str = "auto",
    folder: RunFolder = PREDICT_FOLDER,
    write_json: bool = False,
    threshold: float | None = None,
    tta: str | None = None,
    cam: str = "",
) -> tuple[Path, list[Prediction]]:
    """Classify every image in `sources`; print a table; write predictions.csv (and .json) to a run folder.
    Multi-label weights list every label above `threshold` (default: the one they were trained with). `cam`: a
    grad-cam method; one heatmap overlay per image in cam/, of its top class."""
    from accelerate import Accelerator

    trained = read_weights(weights)
    if threshold is not None and not trained.multilabel:
        raise UserError(
            f"--threshold applies to multi-label weights and {weights} are single-label (a softmax, ranked by "
            "--topk); drop --threshold"
        )
    paths, failed = find_images(sources)
    # Names that are not UTF-8 (bytes from another system's encoding) fit no CSV, JSON or Arrow text: listed, skipped.
    failed += [
        Prediction(_escaped(p), error="file name is not valid UTF-8; rename it") for p in paths if _escaped(p) != str(p)
    ]
    paths = [p for p in paths if _escaped(p) == str(p)]
    if not paths:
        reasons = "; ".join(f"{p.path}: {p.error}" for p in failed)
        raise UserError(f"no images found in {' '.join(sources)}" + (f" ({reasons})" if reasons else ""))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1:
        raise UserError("trainer predict runs in one process; start it without accelerate launch or torchrun")
    # device + launcher's precision; --tta: averaged logits (trainer.use.tta)
    model = accelerator.prepare_model(with_tta(load_model(trained), tta), evaluation_mode=True)
    k = min(topk, trained.num_classes)
    cut = trained.threshold if threshold is None else threshold
    workers = data.num_workers(DataConfig(workers=workers), 1)
    device = accelerator.device
    start = time.time()
    results: list[Prediction] = []
    backend = data.choose_backend(DataConfig(loader=loader), accelerator.device.type)
    batches, unreadable = data.files_loader(paths, data.LoaderSpec(backend, trained.pre, workers), batch_size, device)
    drawer = cam_drawer(trained, cam, device) if cam else None  # refused here, before the run folder exists
    run_dir = make_run_dir(folder)
    results += [Prediction(path, error=reason) for path, reason in unreadable.items()]
    for batch in batches:
        results += [Prediction(path, error=reason) for path, reason in batch.failed.items()]
        if not len(batch):
            continue
        # labels: the files' positions in `paths`
        logits = model(batch.images.to(device)).float()
        if trained.multilabel:
            results += labels_above(logits.sigmoid(), [str(paths[i]) for i in batch.labels.tolist()], trained, cut)
            continue
        probs, classes = logits.softmax(dim=1).topk(k, dim=1)
        for i, p, c in zip(batch.labels.tolist(), probs.tolist(), classes.tolist(), strict=True):
            results.append(Prediction(str(paths[i]), [trained.class_names[j] for j in c], c, p))
        if drawer is not None:
            top = logits.argmax(dim=1).tolist()  # multi-label: the most probable label
            save_heatmaps(drawer, batch.images.to(device), top, [paths[i] for i in batch.labels.tolist()], run_dir)
    if drawer is not None:
        drawer.close()
    seconds = time.time() - start
    order = {str(p): n for n, p in enumerate(paths)}
    results.sort(key=lambda r: order[r.path])
    results += failed

    if trained.multilabel:
        write_labels_csv(results, run_dir / "predictions.csv")
        k = max([len(r.classes) for r in results] + [1])
    else:
        write_csv(results, k, run_dir / "predictions.csv")
    if write_json:
        write_json_file(results, trained.path, run_dir / "predictions.json")
    print_table(results, k, f"label above {cut:g}" if trained.multilabel else "top")
    done = sum(not r.error for r in results)
    print(
        f"{done} image(s) classified by {trained.describe()} in {seconds:.1f}s "
        f"({done / max(seconds, 1e-9):.0f} img/s on {accelerator.device.type}). Results saved to {run_dir}"
    )
    return run_dir, results


def cam_drawer(trained, method: str, device) -> heatmaps.Heatmaps:
    """--cam: the heatmaps of a plain copy of the model (no TTA); refused in one line for a model no rule fits."""
    return heatmaps.Heatmaps(load_model(trained).to(device), trained.model_name, trained.pre, method)


def save_heatmaps(drawer: heatmaps.Heatmaps, images: torch.Tensor, classes: list[int], paths: list, run_dir: Path):
    """cam/{file name}.png per image (`_2`, `_3`, ... when two files share a name)."""
    (run_dir / "cam").mkdir(exist_ok=True)
    for path, picture in zip(paths, drawer.overlays(images, classes), strict=True):
        target = run_dir / "cam" / f"{Path(path).stem}.png"
        n = 1
        while target.exists():
            n += 1
            target = run_dir / "cam" / f"{Path(path).stem}_{n}.png"
        heatmaps.save_overlay(picture, target)


def labels_above(probs: torch.Tensor, paths: list[str], trained, threshold: float) -> list[Prediction]:
    """Per image every label whose probability is above `threshold`, most probable first."""
    results = []
    for path, row in zip(paths, probs.tolist(), strict=True):
        above = sorted((j for j, p in enumerate(row) if p > threshold), key=lambda j: -row[j])
        results.append(Prediction(path, [trained.class_names[j] for j in above], above, [row[j] for j in above]))
    return results


def print_table(results: list[Prediction], k: int, title: str = "top") -> None:
    ok = [r for r in results if not r.error]
    width = min(60, max([len(r.path) for r in ok] + [5]))
    k = min(k, 8) if title != "top" else k
    heads = [f"{title}-{j + 1}" if title == "top" else "label" for j in range(k)]
    note = "" if title == "top" else f"  ({title})"
    print(f"{'image':<{width}}  " + "  ".join(f"{h:>12} {'prob':>6}" for h in heads) + note)
    for r in ok[:PRINTED_ROWS]:
        path = r.path if len(r.path) <= width else "..." + r.path[-(width - 3) :]
        cells = "  ".join(f"{c[:12]:>12} {p:6.3f}" for c, p in zip(r.classes, r.probabilities, strict=True))
        print(f"{path:<{width}}  {cells}")
    if len(ok) > PRINTED_ROWS:
        print(f"... and {len(ok) - PRINTED_ROWS} more in predictions.csv")
    unreadable = [r for r in results if r.error]
    if unreadable:
        print(f"{len(unreadable)} file(s) skipped:")
        for r in unreadable:
            print(f"  {r.path}: {r.error}")


def write_csv(results: list[Prediction], k: int, path: Path) -> None:
    """One row per file: path, top1, prob1, ..., topK, probK, error (empty when classified)."""
    header = ["path"] + [f"{col}{j + 1}" for j in range(k) for col in ("top", "prob")] + ["error"]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in results:
            cells = [v for c, p in zip(r.classes, r.probabilities, strict=True) for v in (c, f"{p:.6f}")]
            writer.writerow([r.path, *cells, *[""] * (2 * k - len(cells)), r.error])


def write_labels_csv(results: list[Prediction], path: Path) -> None:
    """Multi-label: one row per file: path, the labels above the threshold as a JSON list (most probable first),
    their probabilities as a JSON list, error. JSON because a label name may hold any delimiter (a space, a comma):
    `json.loads` gives the names back exactly (`read_predictions_csv`)."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "probs", "error"])
        for r in results:
            probs = [round(p, 6) for p in r.probabilities]
            writer.writerow([r.path, json.dumps(r.classes, ensure_ascii=False), json.dumps(probs), r.error])


def read_predictions_csv(path: Path) -> dict[str, list[tuple[str, float]]]:
    """A multi-label predictions.csv back: per classified file its (label, probability) pairs, most probable first."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if not row["error"]]
    return {row["path"]: list(zip(json.loads(row["labels"]), json.loads(row["probs"]), strict=True)) for row in rows}


def write_json_file(results: list[Prediction], weights: Path, path: Path) -> None:
    images = [
        {
            "path": r.path,
            "predictions": [
                {"class": c, "index": i, "probability": p}
                for c, i, p in zip(r.classes, r.indices, r.probabilities, strict=True)
            ],
        }
        for r in results
        if not r.error
    ]
    unreadable = [{"path": r.path, "error": r.error} for r in results if r.error]
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump({"weights": str(weights), "images": images, "unreadable": unreadable}, f, indent=1)
