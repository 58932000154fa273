"""The up-front check of one image file: readable or not, and why (`check_image`, with PIL), and a cheaper look at
well-formed JPEGs and PNGs (`quick_mode`: the header and the last bytes, without PIL). The class-folder scan checks
every file with them before training starts; `predict` checks its files the same way."""

from __future__ import annotations

import os

from trainer.data.decode import jpeg_markers, unreadable_reason

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}  # IHDR colour type -> PIL mode
JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # SOF component count -> PIL mode
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def check_image(path: str) -> tuple[str | None, str]:
    """(PIL mode, "") for a readable image, (None, reason) otherwise. Reads the header and the file's last bytes;
    decodes fully only when the end looks cut off (a JPEG without its end marker, a PNG without IEND)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)  # parses the header only (and raises DecompressionBombError above twice the limit)
            mode, fmt = img.mode, img.format
            oversized = too_many_pixels(*img.size)
            if oversized:
                return None, oversized
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - 32))
            tail = f.read()
            suspect = (
                (fmt == "JPEG" and b"\xff\xd9" not in tail)
                or (fmt == "PNG" and b"IEND" not in tail)
                or (fmt == "WEBP" and _riff_size(f) > size)
            )
            if suspect:  # camera JPEGs may carry data after the end marker: only a decode tells
                f.seek(0)
                Image.open(f).load()
        return mode, ""
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        if os.path.exists(path) and os.path.getsize(path) == 0:
            return None, "empty file"
        return None, unreadable_reason(e)


def too_many_pixels(width: int, height: int) -> str:
    """Why an image is skipped for its size (a decompression bomb), or "" when it is within PIL's
    `Image.MAX_IMAGE_PIXELS` (89.5 M pixels unless changed; None: no limit). Decoding one would need width x height
    x channels bytes in every worker that draws it."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or width * height <= limit:
        return ""
    return f"{width}x{height} pixels, above the limit of {limit} (PIL's Image.MAX_IMAGE_PIXELS)"


def _riff_size(f) -> int:
    f.seek(4)
    return int.from_bytes(f.read(4), "little") + 8


def quick_mode(path: str, size: int) -> str | None:
    """The mode of a well-formed JPEG or PNG from its first 4 KB and last 32 bytes, without PIL (10x cheaper);
    None for anything else or anything odd, which `check_image` then judges."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            head, tail = os.pread(fd, 4096, 0), os.pread(fd, 32, max(0, size - 32))
        finally:
            os.close(fd)
    except OSError:
        return None
    if head.startswith(PNG_SIGNATURE):
        if head[12:16] != b"IHDR" or b"IEND" not in tail or _large(head, 16, 20, 4):
            return None
        return PNG_MODES.get(head[25])
    if not head.startswith(b"\xff\xd8\xff") or b"\xff\xd9" not in tail:
        return None
    for marker, i in jpeg_markers(head):  # up to the frame header, which holds the component count
        if marker in JPEG_SOF:  # FF Cn, length, precision, height, width, components
            return JPEG_MODES.get(head[i + 9]) if i + 10 <= len(head) and not _large(head, i + 7, i + 5, 2) else None
        if marker == 0xDA:  # start of scan before any frame header: not a JPEG PIL opens
            return None
    return None


def _large(head: bytes, w: int, h: int, n: int) -> bool:
    """Whether the big-endian width at `w` and height at `h` of a header (`n` bytes each: 4 in PNG, 2 in JPEG) are
    over the pixel limit: `check_image` then gives the reason."""
    return bool(too_many_pixels(int.from_bytes(head[w : w + n], "big"), int.from_bytes(head[h : h + n], "big")))
