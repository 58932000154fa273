"""Stored images: the one place an image's encoded bytes and header are read, and where it becomes pixels (PIL).

Every path goes through here: the folder scan reads headers (`jpeg_markers`), the torch backend decodes
(`decode_image`), the DALI backend reads encoded bytes and headers (`read_encoded`, `open_header`, `jpeg_markers`) and
hands pixels to DALI only where PIL decodes them (`decode_image`), `trainer data convert` copies the bytes.
"""

from __future__ import annotations

import io

import numpy as np

# PIL modes of one-channel images: such data trains 1-channel models.
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 is upright
# The files an image folder's scan and `trainer predict` take as images (a file named explicitly is always tried).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
EMBEDDED = "<embedded bytes>"  # the path reported for an image stored as bytes without one


class UnreadableImage(Exception):
    """An image that cannot be read or decoded; carries its path and the reason for the warning."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} ({reason})")
        self.path, self.reason = path, reason


def unreadable_reason(e: Exception) -> str:
    """Why an image could not be read, in a few words (the scan's and the loaders' warnings alike)."""
    from PIL import Image

    if isinstance(e, Image.UnidentifiedImageError):  # its text names a BytesIO object and its address
        return "not an image"
    return f"{type(e).__name__}: {e}".split("\n")[0]


def read_encoded(value) -> tuple[bytes | None, str]:
    """(encoded bytes, path) of a stored image: datasets' {"bytes", "path"}, a path, or bytes. The bytes are None for
    values that hold no encoded image (arrays, PIL images). A file that cannot be read is an UnreadableImage."""
    from PIL import Image

    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path") or EMBEDDED
    elif isinstance(value, bytes):
        data, path = value, EMBEDDED
    elif isinstance(value, str):
        data, path = None, value
    else:
        return None, EMBEDDED
    if data is None and path != EMBEDDED and not isinstance(value, Image.Image):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UnreadableImage(path, unreadable_reason(e)) from e
    return data, path


def open_header(data: bytes, path: str):
    """The PIL image of encoded bytes with only its header parsed (format, mode, size, EXIF of a JPEG)."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for a broken header
        raise UnreadableImage(path, unreadable_reason(e)) from e


def jpeg_markers(data: bytes):
    """(marker, offset) of a JPEG's header segments in order, from after its start-of-image marker up to and including
    the start of scan (0xDA). Stops early, without reaching 0xDA, where the chain of segment lengths breaks or the
    data ends. Reads only the headers (microseconds)."""
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        yield marker, pos
        if marker == 0xDA:  # start of scan: every header segment was where its predecessor said
            return
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # fill byte, markers without a length
            pos += 1 if marker == 0xFF else 2
        elif marker < 0xC0:
            return
        else:
            pos += 2 + (data[pos + 2] << 8 | data[pos + 3])


def jpeg_header_intact(data: bytes) -> bool:
    """Whether a JPEG's header segments chain from its start to its scan. DALI stops its pipeline on those that do
    not ("Invalid marker"), and a decode error inside DALI 2.4 was seen to crash the process a few batches later."""
    return any(marker == 0xDA for marker, _ in jpeg_markers(data))


def decode_image(value):
    """A stored image (datasets' {"bytes", "path"}, a path, bytes, an array or a PIL image) -> loaded PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, dict | str | bytes):
        return Image.fromarray(np.asarray(value, dtype=np.uint8))
    data, path = read_encoded(value)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise UnreadableImage(path, unreadable_reason(e)) from e
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what PIL asks for before dropping a palette's transparency
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        from PIL import ImageOps

        # Upright, as HF datasets' Image feature decodes and as `trainer predict` classifies: a phone photo trains
        # and predicts the way it is seen.
        img = ImageOps.exif_transpose(img)
    return img
