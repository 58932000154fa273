"""`trainer data convert SRC DST`: any source `--data` reads -> WebDataset tar or Parquet shards of a chosen size.

A slow folder (a million small files, a scan per run) is converted once, then read as shards or streamed. The
class names and split sizes go into DST/dataset_info.json (datasets' own DatasetInfo: the label a ClassLabel),
which `--data DST` and `--data DST --streaming` read back. Images are copied as stored, never re-encoded, except
when one split mixes formats in a WebDataset (one extension per column: the odd ones are re-encoded as the first).
"""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import signal
import tarfile
import threading
from pathlib import Path

from trainer.config import DataConfig, UserError
from trainer.data.decode import UnreadableImage, decode_image, read_encoded
from trainer.data.sources import INFO_FILE, load_source

FORMATS = ("webdataset", "parquet")
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}


def parse_shard_size(text: str) -> tuple[int, int]:
    """`10000` -> at most 10,000 samples per shard; `512MB`, `1GB` -> at most that many bytes of images."""
    match = re.fullmatch(r"\s*(\d+)\s*(kb|mb|gb)?\s*", text.lower())
    if not match or int(match.group(1)) < 1:
        raise UserError(f"--shard-size expects a sample count (10000) or a size (512MB, 1GB), got {text!r}")
    value, unit = int(match.group(1)), match.group(2)
    if unit is None:
        return value, 0
    return 0, value * {"kb": 2**10, "mb": 2**20, "gb": 2**30}[unit]


def convert(src: str, dst: str, fmt: str, shard_size: str, *, data_config: str = "") -> dict[str, int]:
    """Write every split of `src` as `{split}-{index:06d}.{tar,parquet}` shards into the new folder `dst`.

    Returns samples written per split. Refuses (UserError) an existing non-empty `dst` and unreadable sources.
    """
    import datasets

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    max_samples, max_bytes = parse_shard_size(shard_size)
    out = Path(dst).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{dst} exists and is not an empty folder; give a new DST (nothing was written)")
    source = load_source(DataConfig(data=src, data_config=data_config))
    if source.skipped:
        print(f"trainer: warning: {len(source.skipped)} unreadable image file(s) left out", flush=True)
    _remove_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    counts = {}
    previous = _terminate_as_exit()
    try:
        for name, split in source.splits.items():
            write = _write_tars if fmt == "webdataset" else _write_parquet
            counts[name] = write(split, tmp, name, max_samples, max_bytes)
        image_name = "image" if fmt == "parquet" else _image_ext(next(iter(source.splits.values())))
        features = datasets.Features(
            {
                image_name: datasets.Image(),
                "label" if fmt == "parquet" else "cls": datasets.ClassLabel(names=source.class_names),
                **(
                    {"__key__": datasets.Value("string"), "__url__": datasets.Value("string")}
                    if fmt != "parquet"
                    else {}
                ),
            }
        )
        info = datasets.DatasetInfo(
            description=f"converted by `trainer data convert` from {src}",
            features=features,
            splits=datasets.SplitDict.from_split_dict(
                {name: {"name": name, "num_examples": n} for name, n in counts.items()}
            ),
        )
        with open(tmp / INFO_FILE, "wb") as f:
            info._dump_info(f, pretty_print=True)
        if out.exists():
            out.rmdir()  # empty: checked above
        _stop_if_signalled()
        os.replace(tmp, out)
    except BaseException:  # errors, Ctrl-C, SIGTERM (made SystemExit above): the partial shards go
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return counts


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders of conversions to `out` whose process is gone (killed with -9, or a machine
    that went down); a live one is left alone. PIDs are this machine's: DST on a shared disk is not guarded."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            print(f"trainer: removing {stale}, left by an earlier conversion that was killed", flush=True)
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _terminate_as_exit():
    """SIGTERM (a scheduler, `kill`) ends the conversion as Ctrl-C does: the temporary folder is removed on the way
    out, exit 143. Returns the handler to restore (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    _SIGNALLED.clear()

    def stop(signum, frame):
        print(f"trainer: {signal.Signals(signum).name}: conversion stopped, nothing written to its DST", flush=True)
        _SIGNALLED.append(signum)
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


_SIGNALLED: list[int] = []  # the signal that stopped the conversion, kept for where the SystemExit was swallowed


def _stop_if_signalled() -> None:
    """Raise the stop again: a SystemExit raised inside a library's broad `except` (datasets' fingerprint hashing
    of `select` swallows it) must still end the conversion. Checked after each shard and before the rename."""
    if _SIGNALLED:
        raise SystemExit(128 + _SIGNALLED[0])


def _shards(sizes: list[int], max_samples: int, max_bytes: int) -> list[range]:
    """Consecutive index ranges, each within the sample and byte limits (a lone oversized sample gets its own)."""
    bounds, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        full = (max_samples and i - start >= max_samples) or (max_bytes and total + size > max_bytes)
        if full and i > start:
            bounds.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        bounds.append(range(start, len(sizes)))
    return bounds


def _image_bytes(value) -> bytes:
    data, _ = read_encoded(value)
    return data


def _image_size(value) -> int:
    return len(value["bytes"]) if value.get("bytes") is not None else os.path.getsize(value["path"])


def _ext_of(data: bytes, path: str | None) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    suffix = Path(path or "").suffix.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(suffix, suffix) or "png"


def _image_ext(split) -> str:
    first = split[0]["image"]
    return _ext_of(_image_bytes(first), first.get("path"))


def _write_tars(split, folder: Path, name: str, max_samples: int, max_bytes: int) -> int:
    """Tar shards in WebDataset layout: `{key}.{ext}` image bytes + `{key}.cls` class index, keys in order."""
    if len(split) == 0:
        return 0
    ext = _image_ext(split)
    images = split.with_format(None)
    sizes = [_image_size(v) for v in images["image"]] if max_bytes else [0] * len(split)
    for index, rows in enumerate(_shards(sizes, max_samples, max_bytes)):
        _stop_if_signalled()
        part = images.select(rows)  # one columnar read per shard, not one per sample
        with tarfile.open(folder / f"{name}-{index:06d}.tar", "w") as tar:
            for i, value, label in zip(rows, part["image"], part["label"], strict=True):
                data = _image_bytes(value)
                if _ext_of(data, value.get("path")) != ext:
                    data = _reencode(data, value, ext)
                key = f"{i:09d}"
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.cls", str(int(label)).encode())
    return len(split)


def _reencode(data: bytes, value, ext: str) -> bytes:
    try:
        img = decode_image({"bytes": data, "path": value.get("path")})
    except UnreadableImage:
        return data  # kept as it is: the reader skips and counts it, as it would have from the source
    buf = io.BytesIO()
    img.convert("RGB" if ext == "jpg" and img.mode not in ("L", "RGB") else img.mode).save(buf, _PIL_FORMAT[ext])
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mode = len(data), 0o644
    tar.addfile(member, io.BytesIO(data))


def _write_parquet(split, folder: Path, name: str, max_samples: int, max_bytes: int) -> int:
    """Parquet shards with the images' bytes embedded and datasets' feature metadata (ClassLabel names) kept."""
    import pyarrow.parquet as pq
    from datasets.table import embed_table_storage

    if len(split) == 0:
        return 0
    sizes = [_image_size(v) for v in split.with_format(None)["image"]] if max_bytes else [0] * len(split)
    for index, rows in enumerate(_shards(sizes, max_samples, max_bytes)):
        _stop_if_signalled()
        part = split.select(rows)
        # The features in the schema: image paths become embedded bytes, and readers get the ClassLabel back.
        table = embed_table_storage(part.with_format("arrow")[:].cast(part.features.arrow_schema))
        pq.write_table(table, folder / f"{name}-{index:06d}.parquet")
    return len(split)
