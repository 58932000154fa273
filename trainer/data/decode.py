"""How a stored image is decoded: the one place a training, evaluation or prediction image becomes pixels (PIL).

The DALI loader decodes the same encoded bytes on its own (trainer/data/dali.py) and matches this module's modes.
"""

from __future__ import annotations

import io

import numpy as np

# PIL modes of one-channel images: such data trains 1-channel models.
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 is upright
# An image that fails to decode mid-run is replaced by the one this many places on (wrapping): the same neighbour
# on every loader path, so the torch and DALI paths stay interchangeable.
NEIGHBOUR_STRIDE = 7919


class UnreadableImage(Exception):
    """An image that cannot be decoded; carries its path for the warning."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} ({reason})")
        self.path = path


def decode_image(value):
    """A stored image (datasets' {"bytes", "path"}, a path, bytes, an array or a PIL image) -> loaded PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str | bytes):
        data, path = (None, value) if isinstance(value, str) else (value, None)
    else:
        return Image.fromarray(np.asarray(value, dtype=np.uint8))
    try:
        img = Image.open(io.BytesIO(data) if data is not None else path)
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise UnreadableImage(path or "<embedded bytes>", f"{type(e).__name__}: {e}".split("\n")[0]) from e
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what PIL asks for before dropping a palette's transparency
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        from PIL import ImageOps

        # Upright, as HF datasets' Image feature decodes and as `trainer predict` classifies: a phone photo trains
        # and predicts the way it is seen.
        img = ImageOps.exif_transpose(img)
    return img
