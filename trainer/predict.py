"""`trainer predict`: top-k classes with probabilities for image files, folders and globs, batched.

Images are preprocessed by `data.ImageTransform` exactly as in validation. A file that cannot be read is listed
with the reason and skipped; the run goes on.
"""

from __future__ import annotations

import csv
import glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from trainer import data
from trainer.config import DataConfig, UserError
from trainer.inference import load_model, read_weights
from trainer.rundirs import RunFolder, make_run_dir

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
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
            found += [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            for folder in (m for m in matches if m.is_dir()):
                found += _images_under(folder)
            if not matches:
                missing.append(Prediction(source, error="no file matches this pattern"))
        else:
            missing.append(Prediction(source, error="no such file or folder"))
    return list(dict.fromkeys(found)), missing


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFiles(Dataset):
    """Decoded, preprocessed images; an unreadable file yields its error instead of a tensor."""

    def __init__(self, paths: list[Path], transform: data.ImageTransform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        from PIL import Image, ImageOps

        try:
            with Image.open(self.paths[index]) as img:
                img = ImageOps.exif_transpose(img)  # as HF datasets decodes training images: upright
                return index, self.transform({"image": [img], "label": [0]})["image"][0], ""
        except Exception as e:  # any decoder failure (truncated, not an image, bomb) means "unreadable"
            return index, None, f"{type(e).__name__}: {e}".split("\n")[0]


def _as_list(items: list) -> list:
    return items  # unreadable files have no tensor: stack the good ones in the loop


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
) -> tuple[Path, list[Prediction]]:
    """Classify every image in `sources`; print a table; write predictions.csv (and .json) to a run folder."""
    from accelerate import Accelerator

    trained = read_weights(weights)
    paths, failed = find_images(sources)
    if not paths:
        reasons = "; ".join(f"{p.path}: {p.error}" for p in failed)
        raise UserError(f"no images found in {' '.join(sources)}" + (f" ({reasons})" if reasons else ""))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes > 1:
        raise UserError("trainer predict runs in one process; start it without accelerate launch or torchrun")
    model = accelerator.prepare_model(load_model(trained), evaluation_mode=True)  # device + launcher's precision
    k = min(topk, trained.num_classes)
    workers = data.num_workers(DataConfig(workers=workers), 1)
    start = time.time()
    results: list[Prediction] = []
    if data.choose_loader(DataConfig(loader=loader), accelerator.device.type).name == "dali":
        batches, unreadable = _dali_batches(paths, trained, batch_size, workers, accelerator.device)
        for images, indices in batches:
            probs, classes = model(images).float().softmax(dim=1).topk(k, dim=1)
            for i, p, c in zip(indices.tolist(), probs.tolist(), classes.tolist(), strict=True):
                results.append(Prediction(str(paths[i]), [trained.class_names[j] for j in c], c, p))
        unreadable += [Prediction(path, error=reason) for path, reason in batches.failed.items()]
        results += unreadable
        torch_batches = None
    else:
        torch_batches = DataLoader(
            ImageFiles(paths, data.ImageTransform(trained.pre, False, 0.0, (1.0, 1.0))),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_as_list,
        )
    for batch in torch_batches or ():
        good = [(i, x) for i, x, _ in batch if x is not None]
        results += [Prediction(str(paths[i]), error=err) for i, x, err in batch if x is None]
        if not good:
            continue
        images = torch.stack([x for _, x in good]).to(accelerator.device)
        probs, indices = model(images).float().softmax(dim=1).topk(k, dim=1)
        for (i, _), p, c in zip(good, probs.tolist(), indices.tolist(), strict=True):
            results.append(Prediction(str(paths[i]), [trained.class_names[j] for j in c], c, p))
    seconds = time.time() - start
    order = {str(p): n for n, p in enumerate(paths)}
    results.sort(key=lambda r: order[r.path])
    results += failed

    run_dir = make_run_dir(folder)
    write_csv(results, k, run_dir / "predictions.csv")
    if write_json:
        write_json_file(results, trained.path, run_dir / "predictions.json")
    print_table(results, k)
    done = sum(not r.error for r in results)
    print(
        f"{done} image(s) classified by {trained.describe()} in {seconds:.1f}s "
        f"({done / max(seconds, 1e-9):.0f} img/s on {accelerator.device.type}). Results saved to {run_dir}"
    )
    return run_dir, results


class _Files(torch.utils.data.Dataset):
    """Image paths -> DALI examples (encoded bytes, the eval window of the upright image); label: the file's index."""

    def __init__(self, paths: list[Path], indices: list[int], examples):
        self.paths, self.indices, self.examples = paths, indices, examples

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        try:
            row = self.examples({"image": [str(self.paths[i])], "label": [i]})
        except data.UnreadableImage as e:  # the header read, the pixels did not (decoded by PIL: not a JPEG)
            return {"path": e.path, "error": str(e).removeprefix(f"{e.path} (").removesuffix(")")}
        return {key: values[0] for key, values in row.items()} | {"index": k}


def _collate_files(rows: list[dict]) -> tuple:
    """A DALI batch of the readable files, and {path: error} of the others (DaliLoader lists them as failed)."""
    from trainer.data import dali

    good = [r for r in rows if "error" not in r]
    failed = {r["path"]: r["error"] for r in rows if "error" in r}
    return (*dali.collate(good), failed) if good else ([], None, None, None, None, [], 0, failed)


def _dali_batches(paths: list[Path], trained, batch_size: int, workers: int, device):
    """A DALI loader over the files whose header reads (the others come back as failed predictions)."""
    from trainer.data import dali
    from trainer.data.folders import check_image

    readable, unreadable = [], []
    for i, path in enumerate(paths):
        mode, reason = check_image(str(path))
        if mode is None:
            unreadable.append(Prediction(str(path), error=reason))
        else:
            readable.append(i)
    files = _Files(paths, readable, dali.DaliExamples(trained.pre, False, upright=True))
    batches = DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=_collate_files)
    spec = dali.PipelineSpec(batch_size, trained.pre, max(1, workers), upright=True)
    return dali.DaliLoader(batches, spec, None, device=device), unreadable


def print_table(results: list[Prediction], k: int) -> None:
    ok = [r for r in results if not r.error]
    width = min(60, max([len(r.path) for r in ok] + [5]))
    print(f"{'image':<{width}}  " + "  ".join(f"{f'top-{j + 1}':>12} {'prob':>6}" for j in range(k)))
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
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in results:
            cells = [v for c, p in zip(r.classes, r.probabilities, strict=True) for v in (c, f"{p:.6f}")]
            writer.writerow([r.path, *cells, *[""] * (2 * k - len(cells)), r.error])


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
    with open(path, "w") as f:
        json.dump({"weights": str(weights), "images": images, "unreadable": unreadable}, f, indent=1)
