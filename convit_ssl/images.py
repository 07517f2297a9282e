"""Reading an image file as 8-bit RGB (or L), whatever its mode.

PIL's `convert("RGB")` clips 16-bit and 32-bit integer images to 0..255, so a
16-bit PNG or TIFF scan becomes almost all white; here their values are scaled
to 8 bits first (value >> 8). Alpha (RGBA, LA, transparent palettes) is dropped,
as PIL, torchvision and timm drop it. VISSL's image datasets read through this
(convit_ssl.vissl.compat.patches, "disk images read once, as 8-bit RGB"), and so do the analyses.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
from PIL import Image

from convit_ssl.files import PathLike

WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer image as 8-bit L (values >> 8 when any exceeds 255); others unchanged."""
    if image.mode not in WIDE_INTEGER_MODES:
        return image
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    if values.max() > 255:
        values = values >> 8
    return Image.fromarray(values.astype(np.uint8), "L")


def open_image(fp: PathLike | BinaryIO, mode: str = "RGB") -> Image.Image:
    """The image at `fp` in `mode` ("RGB" or "L"), read completely (the file is closed)."""
    with Image.open(fp) as image:
        return to_8bit(image).convert(mode)
