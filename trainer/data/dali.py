"""The DALI input path (`--loader dali`): the same batches as the torch loader, decoded by NVIDIA DALI.

DataLoader workers read each image's encoded bytes and draw its crop window and flip in Python, under the seed
`SeededSamples` gives the sample, exactly as the torch path draws them (timm's RandomResizedCrop parameters, then the
flip). In the training process a DALI pipeline with no random operators of its own decodes only that window (ROI
decoding), resizes it to --imgsz, flips and normalises: on the GPU with the "mixed" decoder (hardware JPEG engines),
on the CPU elsewhere. So the torch DataLoader, accelerate's sharding, the per-sample seeds and `skip_first_batches`
stay as they are, and a resumed run needs nothing new: the pipeline holds no state.

The backend has two halves: `DaliExamples` + `collate` in the DataLoader workers (bytes, windows, flips: an
`EncodedBatch`), and `DaliStage` in the training process (decode, then random erasing on the device, each sample under
its own seed: a `Batch`; mixup/cutmix follow in data/mixing.py, as on the torch path).
The stage runs AFTER the loader is sharded (`loaders.Loader`): accelerate's prepare rebuilds DataLoaders and drops
subclasses (accelerate#3322) and cannot prepare DALI iterators (accelerate#2975). Which backend a run uses is
decided in data/backends.py.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.batch import Batch, EncodedBatch, Failed, label_tensor
from trainer.data.decode import (
    EXIF_ORIENTATION,
    UnreadableImage,
    decode_image,
    jpeg_header_intact,
    open_header,
    read_encoded,
)
from trainer.data.samples import Replacement, kept_generators, reseed
from trainer.data.transforms import Preprocess

# Handed to DALI as stored: JPEG, where ROI decoding and the GPU's JPEG decoders pay. Anything else (PNG, WebP, CMYK,
# 16-bit, GIF, raw arrays) is decoded by PIL in the workers exactly as on the torch path and handed over as PNM, which
# DALI reads without decoding work; a file PIL cannot decode is replaced there (samples.Replacement).
# (DALI also decodes PNG, WebP and BMP as PIL does, but a decode error inside DALI 2.4 stops its pipeline and was
# seen to crash the training process a few batches later.)
NATIVE_FORMATS = frozenset({"JPEG"})
NATIVE_MODES = {"RGB": frozenset({"L", "RGB", "RGBA", "P"}), "L": frozenset({"L"})}
RATIO = (3 / 4, 4 / 3)  # timm's RandomResizedCrop aspect range, as create_transform uses it


# --- DataLoader workers: bytes, windows, flips; no pixels -------------------------------------------------------


class DaliExamples:
    """HF `with_transform` for DALI batches: stored images -> encoded bytes, crop window (x, y, w, h), flip, seed.

    Training draws the window and flip as the torch path does (timm's RandomResizedCrop.get_params on the image size
    read from the header, then the flip), so under the same seed both paths crop the same regions; then the seed of the
    sample's random erasing on the device. Evaluation takes
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
        out: dict[str, list] = {"encoded": [], "window": [], "flip": [], "path": [], "seed": []}
        for value in batch["image"]:
            encoded, img, path = self.encoded(value)
            out["encoded"].append(encoded)
            out["window"].append(self.window(img))
            out["flip"].append(int(self.train and self.hflip > 0 and torch.rand(1).item() < self.hflip))
            out["path"].append(path)
            out["seed"].append(random.getrandbits(62) if self.train else 0)
        out["label"] = batch["label"]
        return out

    def encoded(self, value) -> tuple[np.ndarray, object, str]:
        """(bytes DALI decodes to what `decode_image(value).convert(mode)` gives, the PIL image (perhaps only its
        header read), path)."""
        data, path = read_encoded(value)
        if data is not None:
            img = open_header(data, path)
            native = img.format in NATIVE_FORMATS and img.mode in NATIVE_MODES[self.mode]
            # A rotated photo (EXIF orientation) is turned upright by decode_image, as on the torch path: PIL here.
            # (Read for JPEGs only, where EXIF sits in the header: PIL finds a PNG's by reading the whole file.)
            upright = img.format != "JPEG" or img.getexif().get(EXIF_ORIENTATION, 1) == 1
            # A JPEG whose header segments do not chain would stop DALI's pipeline: PIL decodes it (or it is replaced).
            if native and upright and (img.format != "JPEG" or jpeg_header_intact(data)):
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


def _pnm(pixels: np.ndarray) -> np.ndarray:
    height, width = pixels.shape[:2]
    header = f"{'P6' if pixels.ndim == 3 else 'P5'}\n{width} {height}\n255\n".encode()
    return np.frombuffer(header + np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), dtype=np.uint8)


def collate(examples: list) -> EncodedBatch:
    """An EncodedBatch of worker examples (those that failed and were not replaced go to `failed`).

    Draws nothing: each sample brought its own seed for random erasing on the device."""
    failed = {e.path: e.reason for e in examples if isinstance(e, Failed)}
    examples = [e for e in examples if not isinstance(e, Failed)]
    return EncodedBatch(
        encoded=[e["encoded"] for e in examples],
        windows=np.stack([e["window"] for e in examples]) if examples else np.zeros((0, 4), np.float32),
        flips=np.array([e["flip"] for e in examples], dtype=np.int32),
        labels=label_tensor([e["label"] for e in examples]),
        indices=np.array([e["index"] for e in examples], dtype=np.int64),
        paths=[e["path"] for e in examples],
        seeds=np.array([e["seed"] for e in examples], dtype=np.int64),
        failed=failed,
    )


# --- The training process: decode, resize, flip, normalise; then random erasing on the device -------------------


@dataclass(frozen=True)
class PipelineSpec:
    """What the DALI pipeline needs: the batch size it may see, the output geometry, and where it runs."""

    batch_size: int
    pre: Preprocess
    threads: int = 1
    hw_decoder_load: float = 0.65  # share of JPEGs for the hardware decoder (A100/H100/H200), the rest on nvJPEG
    prefetch: int = 0  # batches DALI decodes ahead of the one trained on (0: feed, decode, hand over, then the next)
    upright: bool = False  # apply EXIF orientation (trainer predict)


class DaliStage:
    """The DALI backend's work in the training process: EncodedBatches in, decoded `Batch`es out, on `device`.

    `random_erase` runs on the decoded batch, on its device, each sample under its own seed (`EncodedBatch.seeds`).
    `samples` (the dataset the workers read: `SeededSamples`, or `Indexed` for evaluation) serves replacements for
    files that fail inside DALI, by the one `Replacement` policy; without it (trainer predict) such files are left out
    and listed in `Batch.failed`.
    """

    def __init__(self, spec: PipelineSpec, samples=None, *, random_erase: float = 0.0, device=None, size=None):
        """`size`: --progressive's `TrainSize`, the size a batch is resized to (a pipeline per size)."""
        self.spec, self.samples, self.size = spec, samples, size
        self.random_erase = random_erase
        self.device = torch.device(device or "cpu")
        self.policy = Replacement(replace=samples is not None)
        self._pipe, self._sized = None, {}  # the pipeline of the size in force; the others made so far
        # Pipelines stopped by a decode error stay referenced: a crash (SIGSEGV) was seen in runs after such an error,
        # and destroying one is the step we could not rule out. Rare, and small.
        self._stopped_pipelines: list = []

    def on(self, device) -> DaliStage:
        """The same stage decoding onto `device` (the prepared loader's), with a pipeline of its own."""
        new = DaliStage.__new__(DaliStage)
        new.__dict__.update(self.__dict__, device=torch.device(device), _pipe=None, _sized={})
        return new

    def run(self, inner):
        """Decode every EncodedBatch of `inner` (a prepared DataLoader). With spec.prefetch > 0 DALI decodes batches
        ahead (its threads, or the GPU, work while the model trains); accelerate reads end_of_dataloader from the
        inner loader: the batches queued before the last one must not see it set."""
        queued: deque = deque()
        for batch in inner:
            failed = batch.failed
            if not len(batch):
                if failed:  # every file of the batch failed in the workers (trainer predict lists them)
                    yield Batch(torch.empty(0), batch.labels, torch.empty(0, dtype=torch.long), failed)
                continue
            self._feed(batch)
            queued.append(batch)
            if getattr(inner, "end_of_dataloader", False):
                inner.end_of_dataloader = False
                while len(queued) > 1:
                    yield self._finish(queued)
                inner.end_of_dataloader = True
            if len(queued) > self.spec.prefetch or getattr(inner, "end_of_dataloader", False):
                yield self._finish(queued)
        while queued:
            yield self._finish(queued)

    def _pipeline(self):
        px = self.spec.pre.imgsz if self.size is None else int(self.size)
        if px not in self._sized:
            self._sized[px] = build_pipeline(self.spec, self.device, px)
        self._pipe = self._sized[px]
        return self._pipe

    def _discard_pipeline(self) -> None:
        self._stopped_pipelines.append(self._pipe)
        self._sized = {px: pipe for px, pipe in self._sized.items() if pipe is not self._pipe}
        self._pipe = None

    def _feed(self, batch: EncodedBatch) -> None:
        windows = batch.windows
        # Decode the whole pixels covering the window; resize samples the (perhaps fractional) window inside them.
        start = np.floor(windows[:, :2])
        end = np.ceil(windows[:, :2] + windows[:, 2:])
        pipe = self._pipeline()
        pipe.feed_input("encoded", batch.encoded)
        pipe.feed_input("anchor", start.astype(np.float32))
        pipe.feed_input("shape", (end - start).astype(np.float32))
        pipe.feed_input("roi_start", (windows[:, 1::-1] - start[:, ::-1]).astype(np.float32))  # (y, x)
        pipe.feed_input("roi_end", (windows[:, 1::-1] + windows[:, :1:-1] - start[:, ::-1]).astype(np.float32))
        pipe.feed_input("mirror", batch.flips)
        pipe.schedule_run()

    def _finish(self, queued: deque) -> Batch:
        batch = queued.popleft()
        try:
            images = self._images(self._pipeline().outputs()[0])
        except RuntimeError:  # DALI stops the whole pipeline at a decode error (DALI#3913): rebuild it
            self._discard_pipeline()
            batch = self._repair(batch)
            if len(batch):
                self._feed(batch)
                images = self._images(self._pipeline().outputs()[0])
            else:
                images = torch.empty(0, device=self.device)
            for later in queued:  # the batches scheduled behind the failed one died with the old pipeline
                self._feed(later)
        if self.random_erase > 0:
            self._erase(images, batch.seeds)
        labels = batch.labels.to(self.device)
        indices = torch.from_numpy(batch.indices)
        return Batch(images, labels, indices, batch.failed)

    def _images(self, output) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = output.as_tensor()
        images = torch.empty(tensor.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(tensor, images, cuda_stream=stream)
        return images

    def _erase(self, images: torch.Tensor, seeds: np.ndarray) -> None:
        """timm's random erasing of each image in place, under the sample's own seed (the same in any batch)."""
        from timm.data.random_erasing import RandomErasing

        erase = RandomErasing(self.random_erase, mode="pixel", device=str(self.device))
        with kept_generators(self.device):
            for image, seed in zip(images, seeds.tolist(), strict=True):
                reseed(seed, self.device)
                erase(image)

    def _repair(self, batch: EncodedBatch) -> EncodedBatch:
        """The batch with each sample DALI cannot decode replaced by the `Replacement` policy (or, without samples to
        replace it from, left out and listed in `failed`)."""
        encoded, windows, flips, labels = list(batch.encoded), batch.windows.copy(), batch.flips.copy(), batch.labels
        seeds = batch.seeds.copy()
        labels, keep, failed = labels.clone(), [], dict(batch.failed)
        for j in range(len(batch)):
            own = {"encoded": encoded[j], "window": windows[j], "flip": flips[j], "label": labels[j].tolist()}
            own["seed"] = int(seeds[j])
            row = self.policy.first_readable(self._candidates(batch, j, own), f"index {batch.indices[j]}")
            if isinstance(row, Failed):
                failed[row.path] = row.reason
                continue
            keep.append(j)
            encoded[j], windows[j], flips[j], labels[j], seeds[j] = (
                row["encoded"],
                row["window"],
                row["flip"],
                torch.as_tensor(row["label"], dtype=labels.dtype),
                row["seed"],
            )
        repaired = EncodedBatch(encoded, windows, flips, labels, batch.indices, batch.paths, seeds, failed)
        return repaired.take(keep)

    def _candidates(self, batch: EncodedBatch, j: int, own: dict):
        """Sample j of the batch as it is, then its neighbours (each drawn under its own seed by `samples`), checked by
        DALI."""
        yield lambda: self._checked(own, batch.paths[j])
        if self.samples is None:
            return
        neighbours = self.policy.neighbours(self.samples, int(batch.indices[j]))
        next(neighbours)  # the sample itself: yielded above, as the batch holds it
        for fetch in neighbours:
            yield lambda fetch=fetch: self._checked(fetch())

    def _checked(self, row: dict, path: str | None = None) -> dict:
        """`row` if DALI decodes its window, else UnreadableImage (the pipeline it stopped is set aside)."""
        try:
            self._feed(
                EncodedBatch(
                    [row["encoded"]],
                    row["window"][None],
                    np.array([row["flip"]], dtype=np.int32),
                    torch.zeros(1, dtype=torch.long),
                    np.zeros(1, np.int64),
                    [""],
                    np.zeros(1, np.int64),
                )
            )
            self._pipeline().outputs()
            return row
        except RuntimeError as e:
            self._discard_pipeline()
            raise UnreadableImage(path or row["path"], f"DALI: {str(e).splitlines()[0]}") from e


def build_pipeline(spec: PipelineSpec, device: torch.device, imgsz: int = 0):
    """A stateless DALI pipeline: ROI decode of each window, resize to `imgsz` (0: spec.pre.imgsz), flip, normalise
    to CHW float."""
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
            size=[imgsz or pre.imgsz] * 2,
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
