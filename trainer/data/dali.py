"""The DALI input path (`--loader dali`): the same batches as the torch loader, decoded by NVIDIA DALI.

DataLoader workers read each image's encoded bytes and draw its crop window and flip in Python, under the seed
`SeededBatches` gives the batch, exactly as the torch path draws them (timm's RandomResizedCrop parameters, then the
flip). In the training process a DALI pipeline with no random operators of its own decodes only that window (ROI
decoding), resizes it to --imgsz, flips and normalises: on the GPU with the "mixed" decoder (hardware JPEG engines),
on the CPU elsewhere. So the torch DataLoader, accelerate's sharding, the per-batch seeds and `skip_first_batches`
stay as they are, and a resumed run needs nothing new: the pipeline holds no state.

`DaliLoader` wraps a loader AFTER `accelerator.prepare`: prepare rebuilds DataLoaders and drops subclasses
(accelerate#3322) and cannot prepare DALI iterators (accelerate#2975).
"""

from __future__ import annotations

import io
import math
import random
import sys
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import DataConfig, UserError
from trainer.data.decode import EXIF_ORIENTATION, NEIGHBOUR_STRIDE, UnreadableImage, decode_image
from trainer.data.transforms import Preprocess, seeded

INSTALL = "pip install 'trainer[dali]' (the nvidia-dali-cuda130 wheel; nvidia-dali-cuda120 for CUDA 12 drivers)"
# Handed to DALI as stored: JPEG, where ROI decoding and the GPU's JPEG decoders pay. Anything else (PNG, WebP, CMYK,
# 16-bit, GIF, raw arrays) is decoded by PIL in the workers exactly as on the torch path and handed over as PNM, which
# DALI reads without decoding work; a file PIL cannot decode is replaced by its neighbour there (SkipUnreadable).
# (DALI also decodes PNG, WebP and BMP as PIL does, but a decode error inside DALI 2.4 stops its pipeline and was
# seen to crash the training process a few batches later.)
NATIVE_FORMATS = frozenset({"JPEG"})
NATIVE_MODES = {"RGB": frozenset({"L", "RGB", "RGBA", "P"}), "L": frozenset({"L"})}
RATIO = (3 / 4, 4 / 3)  # timm's RandomResizedCrop aspect range, as create_transform uses it


@dataclass(frozen=True)
class LoaderChoice:
    """The loader a run uses, and why (recorded in config.yaml; `note` is said once on the console)."""

    name: str
    reason: str
    note: str = ""


def dali_missing() -> str:
    """Why `nvidia.dali` cannot be used here ("" when it imports)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return ""


def choose_loader(cfg: DataConfig, device_type: str) -> LoaderChoice:
    """--loader torch|dali|auto -> the loader used. `auto` takes DALI only with CUDA, DALI installed and an
    augmentation DALI can reproduce; `dali` without DALI installed is refused."""
    if cfg.loader == "torch":
        return LoaderChoice("torch", "--loader torch")
    if cfg.streaming:  # a stream's batches come from data/streaming.py's own DataLoader, which feeds no DALI stage
        if cfg.loader == "dali":
            raise UserError("--loader dali does not read --streaming data yet; use --loader torch (or auto)")
        return LoaderChoice("torch", "auto: --streaming reads through the torch DataLoader")
    if cfg.loader == "dali":
        missing = dali_missing()
        if missing:
            raise UserError(f"--loader dali needs NVIDIA DALI, which does not import ({missing}); {INSTALL}")
        return LoaderChoice("dali", "--loader dali")
    # Importing DALI takes a second: only when auto could take it.
    if device_type != "cuda":
        return LoaderChoice("torch", "auto: no CUDA device (DALI's CPU path is for tests; --loader dali forces it)")
    if cfg.auto_augment:
        reason = f"auto: --auto-augment {cfg.auto_augment} has no DALI equivalent"
        return LoaderChoice("torch", reason, note=f"{reason}; loading with the torch DataLoader")
    missing = dali_missing()
    if missing:
        return LoaderChoice("torch", f"auto: nvidia.dali not installed ({INSTALL})")
    return LoaderChoice("dali", "auto: CUDA device and nvidia.dali available")


# --- DataLoader workers: bytes, windows, flips; no pixels -------------------------------------------------------


class DaliExamples:
    """HF `with_transform` for DALI batches: stored images -> encoded bytes, crop window (x, y, w, h), flip.

    Training draws the window and flip as the torch path does (timm's RandomResizedCrop.get_params on the image size
    read from the header, then the flip), so under the same seed both paths crop the same regions. Evaluation takes
    the window of timm's eval transform (shorter side to imgsz / crop_pct, centre crop) in original pixels.
    """

    def __init__(
        self,
        pre: Preprocess,
        train: bool,
        hflip: float = 0.0,
        scale: tuple[float, float] = (0.08, 1.0),
        *,
        upright: bool = False,
    ):
        """`upright`: apply EXIF orientation here too (`trainer predict`); `decode_image` already does for every
        file it decodes, and rotated JPEGs are decoded by it, so every path sees upright images."""
        self.pre, self.train, self.hflip, self.scale, self.upright = pre, train, hflip, scale, upright
        self.mode = "L" if pre.in_chans == 1 else "RGB"

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"encoded": [], "window": [], "flip": [], "path": []}
        for value in batch["image"]:
            encoded, img, path = self.encoded(value)
            out["encoded"].append(encoded)
            out["window"].append(self.window(img))
            out["flip"].append(int(self.train and self.hflip > 0 and torch.rand(1).item() < self.hflip))
            out["path"].append(path)
        out["label"] = batch["label"]
        return out

    def encoded(self, value) -> tuple[np.ndarray, object, str]:
        """(bytes DALI decodes to what `decode_image(value).convert(mode)` gives, the PIL image (perhaps only its
        header read), path)."""
        from PIL import Image

        data, path = None, "<embedded bytes>"
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path") or path
        elif isinstance(value, str):
            path = value
        elif isinstance(value, bytes):
            data = value
        if data is None and path != "<embedded bytes>" and not isinstance(value, Image.Image):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise UnreadableImage(path, f"{type(e).__name__}: {e}") from e
        if data is not None:
            try:
                img = Image.open(io.BytesIO(data))  # the header only
            except Exception as e:  # PIL raises many types for a broken header
                raise UnreadableImage(path, f"{type(e).__name__}: {e}".split("\n")[0]) from e
            native = img.format in NATIVE_FORMATS and img.mode in NATIVE_MODES[self.mode]
            # A rotated photo (EXIF orientation) is turned upright by decode_image, as on the torch path: PIL here.
            # (Read for JPEGs only, where EXIF sits in the header: PIL finds a PNG's by reading the whole file.)
            upright = img.format != "JPEG" or img.getexif().get(EXIF_ORIENTATION, 1) == 1
            if native and upright and (img.format != "JPEG" or not bad_jpeg_markers(data)):
                return np.frombuffer(data, dtype=np.uint8), img, path
        pixels = decode_image(value if data is None else {"bytes": data, "path": path})
        if self.upright:
            from PIL import ImageOps

            pixels = ImageOps.exif_transpose(pixels)
        pixels = pixels.convert(self.mode)
        return _pnm(np.asarray(pixels)), pixels, path

    def window(self, img) -> np.ndarray:
        """(x, y, width, height) of the region to decode, in the image's pixels."""
        if self.train:
            from timm.data.transforms import RandomResizedCropAndInterpolation

            top, left, h, w = RandomResizedCropAndInterpolation.get_params(img, self.scale, RATIO)
            return np.array([left, top, w, h], dtype=np.float32)
        # timm's eval transform: the shorter side to floor(imgsz / crop_pct) (torchvision Resize), then CenterCrop,
        # mapped back to the image's own pixels (fractional: DALI's resize samples that sub-pixel region).
        width, height = img.size
        if self.upright and img.format == "JPEG" and img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width  # DALI turns it upright before taking the window
        short = math.floor(self.pre.imgsz / self.pre.crop_pct)
        new_w, new_h = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        left, top = round((new_w - self.pre.imgsz) / 2.0), round((new_h - self.pre.imgsz) / 2.0)
        sx, sy = width / new_w, height / new_h
        return np.array([left * sx, top * sy, self.pre.imgsz * sx, self.pre.imgsz * sy], dtype=np.float32)


def bad_jpeg_markers(encoded: bytes) -> bool:
    """True when a JPEG's marker segments do not chain from its start to the start of its scan: DALI stops the
    pipeline on those ("Invalid marker"), and a decode error inside DALI 2.4 was seen to crash the training process
    a few batches later (SIGSEGV). Such files take the PIL path instead: decoded there if PIL can, else replaced by
    a neighbour as on the torch path. Reads only the headers (microseconds)."""
    pos, size = 2, len(encoded)
    while pos + 4 <= size:
        if encoded[pos] != 0xFF:
            return True
        marker = encoded[pos + 1]
        if marker == 0xDA:  # start of scan: every header segment was where its predecessor said
            return False
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # fill byte, markers without a length
            pos += 1 if marker == 0xFF else 2
        elif marker < 0xC0:
            return True
        else:
            pos += 2 + (encoded[pos + 2] << 8 | encoded[pos + 3])
    return True


def _pnm(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    header = f"{'P6' if pixels.ndim == 3 else 'P5'}\n{width} {height}\n255\n".encode()
    return np.frombuffer(header + np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), dtype=np.uint8)


class Indexed(torch.utils.data.Dataset):
    """Adds each example's dataset index, so the training process can fetch a neighbour for a file DALI rejects."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "index": index}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [{**row, "index": i} for row, i in zip(self.dataset.__getitems__(indices), indices, strict=True)]


def collate(examples: list[dict]) -> tuple:
    """A DALI batch: (encoded bytes, windows (B, 4), flips (B,), labels, indices, paths, the batch's device seed).

    Runs under the batch's seed (SeededBatches.collate): the seed drawn here drives mixup/cutmix and random erasing
    on the device, so they repeat exactly as on the torch path."""
    return (
        [e["encoded"] for e in examples],
        np.stack([e["window"] for e in examples]),
        np.array([e["flip"] for e in examples], dtype=np.int32),
        torch.tensor([e["label"] for e in examples], dtype=torch.long),
        np.array([e["index"] for e in examples], dtype=np.int64),
        [e["path"] for e in examples],
        random.getrandbits(62),
    )


# --- The training process: decode, resize, flip, normalise; then mixup and erasing on the device -------------------


@dataclass(frozen=True)
class PipelineSpec:
    """What the DALI pipeline needs: the batch size it may see, the output geometry, and where it runs."""

    batch_size: int
    pre: Preprocess
    threads: int = 1
    hw_decoder_load: float = 0.65  # share of JPEGs for the hardware decoder (A100/H100/H200), the rest on nvJPEG
    prefetch: int = 0  # batches DALI decodes ahead of the one trained on (0: feed, decode, hand over, then the next)
    upright: bool = False  # apply EXIF orientation (trainer predict)


class DaliLoader:
    """A prepared loader of DALI batches, decoded per batch: iterates it, delegates everything else to it.

    `mixup` (timm Mixup) and `random_erase` run on the decoded batch, on its device, under the batch's seed.
    `dataset` (the `Indexed` dataset behind the loader, kept as `samples`) serves neighbours for files that fail
    inside DALI; without one (trainer predict) such files are left out of their batch and listed in `failed`.
    """

    def __init__(self, loader, spec: PipelineSpec, dataset, *, mixup=None, random_erase: float = 0.0, device=None):
        self.loader, self.spec, self.samples = loader, spec, dataset
        self.mixup, self.random_erase = mixup, random_erase
        self.device = torch.device(device or "cpu")
        self.warned: set[str] = set()
        self.failed: dict[str, str] = {}
        self._pipe, self._reason = None, ""
        # Pipelines stopped by a decode error stay referenced: a crash (SIGSEGV) was seen in runs after such an error,
        # and destroying one is the step we could not rule out. Rare, and small.
        self._stopped_pipelines: list = []

    # Delegation: the engine sees the prepared loader's length, epoch setting, workers and dataset.
    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name in ("loader", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def wrapping(self, loader, device=None) -> DaliLoader:
        """The same DALI stage around another loader (the prepared one, or one with its first batches skipped)."""
        new = DaliLoader.__new__(DaliLoader)
        new.__dict__.update(self.__dict__, loader=loader, _pipe=None)
        if device is not None:
            new.device = torch.device(device)
        return new

    def __iter__(self):
        # With spec.prefetch > 0 DALI decodes batches ahead (its threads, or the GPU, work while the model trains).
        # accelerate reads end_of_dataloader from the inner loader: the batches queued before the last one
        # must not see it set.
        inner, queued = self.loader, deque()
        for batch in inner:
            if len(batch) > 7:  # trainer predict: files that failed in the workers, by path
                self.failed.update(batch[7])
                if not batch[0]:
                    continue
            self._feed(batch)
            queued.append(batch)
            if getattr(inner, "end_of_dataloader", False):
                inner.end_of_dataloader = False
                while len(queued) > 1:
                    yield from self._finished(queued)
                inner.end_of_dataloader = True
            if len(queued) > self.spec.prefetch or getattr(inner, "end_of_dataloader", False):
                yield from self._finished(queued)
        while queued:
            yield from self._finished(queued)

    def _finished(self, queued: deque):
        out = self._finish(queued)
        if out is not None:  # None: every file of the batch failed (trainer predict lists them)
            yield out

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(self.spec, self.device)
        return self._pipe

    def _discard_pipeline(self) -> None:
        self._stopped_pipelines.append(self._pipe)
        self._pipe = None

    def _feed(self, batch) -> None:
        encoded, windows, flips = batch[:3]
        # Decode the whole pixels covering the window; resize samples the (perhaps fractional) window inside them.
        start = np.floor(windows[:, :2])
        end = np.ceil(windows[:, :2] + windows[:, 2:])
        pipe = self._pipeline()
        pipe.feed_input("encoded", encoded)
        pipe.feed_input("anchor", start.astype(np.float32))
        pipe.feed_input("shape", (end - start).astype(np.float32))
        pipe.feed_input("roi_start", (windows[:, 1::-1] - start[:, ::-1]).astype(np.float32))  # (y, x)
        pipe.feed_input("roi_end", (windows[:, 1::-1] + windows[:, :1:-1] - start[:, ::-1]).astype(np.float32))
        pipe.feed_input("mirror", flips)
        pipe.schedule_run()

    def _finish(self, queued: deque):
        batch = queued.popleft()
        try:
            images = self._images(self._pipeline().outputs()[0])
        except RuntimeError:  # DALI stops the whole pipeline at a decode error (DALI#3913): rebuild it
            self._discard_pipeline()
            batch = self._repair(batch)
            if not batch[0]:
                return None
            self._feed(batch)
            images = self._images(self._pipeline().outputs()[0])
            for later in queued:  # the batches scheduled behind the failed one died with the old pipeline
                self._feed(later)
        labels, seed = batch[3].to(self.device), batch[6]
        return seeded(seed, lambda: self._augment(images, labels), self.device)

    def _images(self, output) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = output.as_tensor()
        images = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(tensor, images, cuda_stream=stream)
        return images

    def _augment(self, images: torch.Tensor, labels: torch.Tensor):
        if self.random_erase > 0:
            from timm.data.random_erasing import RandomErasing

            images = RandomErasing(self.random_erase, mode="pixel", device=str(self.device))(images)
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        return images, labels

    def _repair(self, batch) -> tuple:
        """The batch with each sample DALI cannot decode replaced by its neighbour (as SkipUnreadable does)."""
        encoded, windows, flips, labels, indices, paths, seed = batch
        if self.samples is None:
            keep = [
                j
                for j in range(len(encoded))
                if self._decodes(encoded[j], windows[j], flips[j]) or self._fail(paths[j])
            ]
            return [encoded[j] for j in keep], windows[keep], flips[keep], labels[keep], indices[keep], paths, seed
        encoded, windows, flips, labels = list(encoded), windows.copy(), flips.copy(), labels.clone()
        for j in range(len(encoded)):
            if self._decodes(encoded[j], windows[j], flips[j]):
                continue
            reason = self._reason
            self._warn(paths[j], reason)
            for attempt in range(1, 17):
                index = (int(indices[j]) + attempt * NEIGHBOUR_STRIDE) % len(self.samples)
                try:
                    row = seeded(seed + j + attempt, lambda i=index: self.samples[i])
                except UnreadableImage as e:
                    self._warn(e.path, "unreadable")
                    continue
                if self._decodes(row["encoded"], row["window"], row["flip"]):
                    encoded[j], windows[j], flips[j] = row["encoded"], row["window"], row["flip"]
                    labels[j] = row["label"]
                    break
                self._warn(row["path"], self._reason)
            else:
                raise RuntimeError(f"16 images in a row near index {indices[j]} fail to decode; check the dataset")
        return encoded, windows, flips, labels, indices, paths, seed

    def _fail(self, path: str) -> bool:
        self.failed[path] = f"DALI: {self._reason}"
        return False

    def _decodes(self, encoded, window, flip) -> bool:
        try:
            self._feed(([encoded], window[None], np.array([flip], dtype=np.int32)))
            self._pipeline().outputs()
            return True
        except RuntimeError as e:
            self._discard_pipeline()
            self._reason = str(e).split("\n")[0]
            return False

    def _warn(self, path: str, reason: str) -> None:
        if path not in self.warned:
            self.warned.add(path)
            print(f"trainer: warning: skipped unreadable image {path} (DALI: {reason})", file=sys.stderr, flush=True)


def build_pipeline(spec: PipelineSpec, device: torch.device):
    """A stateless DALI pipeline: ROI decode of each window, resize to imgsz, flip, normalise to CHW float."""
    from nvidia.dali import fn, pipeline_def, types

    pre = spec.pre
    on_gpu = device.type == "cuda"
    interp = types.INTERP_CUBIC if pre.interpolation == "bicubic" else types.INTERP_LINEAR

    @pipeline_def(
        batch_size=spec.batch_size,
        num_threads=spec.threads,
        device_id=(device.index or 0) if on_gpu else None,
        prefetch_queue_depth=1,  # inputs are fed one batch at a time; DaliLoader schedules ahead itself
        # Synchronous without prefetch: DALI 2.4's asynchronous executors were seen to crash (SIGSEGV) in the
        # runs after a decode error, even with the failed pipeline kept alive.
        exec_async=spec.prefetch > 0,
        exec_pipelined=spec.prefetch > 0,
    )
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
        shape = fn.external_source(name="shape", dtype=types.FLOAT)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT)
        mirror = fn.external_source(name="mirror", dtype=types.INT32)
        extra = {"hw_decoder_load": spec.hw_decoder_load} if on_gpu else {}
        images = fn.decoders.image_slice(
            encoded,
            anchor,
            shape,
            device="mixed" if on_gpu else "cpu",
            output_type=types.GRAY if pre.in_chans == 1 else types.RGB,
            axis_names="WH",
            normalized_anchor=False,
            normalized_shape=False,
            adjust_orientation=spec.upright,  # only upright JPEGs reach DALI (rotated ones are decoded by PIL)
            **extra,
        )
        images = fn.resize(
            images,
            size=[pre.imgsz, pre.imgsz],
            roi_start=roi_start,
            roi_end=roi_end,
            roi_relative=False,
            interp_type=interp,
            antialias=True,
        )
        return fn.crop_mirror_normalize(
            images,
            mirror=mirror,
            mean=[m * 255 for m in pre.mean],
            std=[s * 255 for s in pre.std],
            output_layout="CHW",
            dtype=types.FLOAT,
        )

    pipe = pipeline()
    pipe.build()
    return pipe


def dali_threads(cpus_per_rank: int, workers: int) -> int:
    """DALI's CPU threads per rank: the cores the DataLoader workers (which only read bytes) leave."""
    return max(1, min(8, cpus_per_rank - workers))
