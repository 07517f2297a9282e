"""The per-image part of a self-supervised recipe on 8-bit tensors: resizes,
random resized crops, copies and horizontal flips, as uint8 (3, H, W) crops.

What VISSL's Resize / ImgPilToMultiCrop / ImgReplicatePil / RandomResizedCrop /
RandomHorizontalFlip do on PIL images, with the same random draws in the same
order (torchvision's `RandomResizedCrop.get_params` and one `torch.rand` per
flip, on torch's global generator, as the loader worker seeds it), so that a
seed gives the same crop boxes. Only each crop's box of the decoded image
becomes a tensor; resizing is torchvision's on uint8 tensors (antialiased,
as PIL's), 2-4x faster than PIL's per crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ResizedCrop:
    """torchvision's RandomResizedCrop: area fraction in `scale`, aspect ratio in `ratio`."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = RATIO
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        top, left, h, w = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        if isinstance(image, Image.Image):  # only the box becomes a tensor: cheaper than the whole image
            region = to_uint8_tensor(image.crop((left, top, left + w, top + h)))
            return F.resize(region, [self.size, self.size], self.interpolation, antialias=True)
        return F.resized_crop(image, top, left, h, w, [self.size, self.size], self.interpolation, antialias=True)


@dataclass(frozen=True)
class Resize:
    """torchvision's Resize with an int size: the shorter side to `size`, aspect kept."""

    size: int
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def __call__(self, image: Tensor) -> Tensor:
        return F.resize(image, [self.size], self.interpolation, antialias=True)


@dataclass(frozen=True)
class MultiCrop:
    """VISSL's ImgPilToMultiCrop: one image -> these crops, in order."""

    crops: tuple[ResizedCrop, ...]


@dataclass(frozen=True)
class Replicate:
    """VISSL's ImgReplicatePil: one image -> `times` copies."""

    times: int


@dataclass(frozen=True)
class HorizontalFlip:
    p: float = 0.5


CropOp = Resize | MultiCrop | Replicate | ResizedCrop | HorizontalFlip


def to_uint8_tensor(image: Image.Image | Tensor) -> Tensor:
    """An RGB PIL image (or a uint8 tensor, unchanged) as a uint8 (3, H, W) tensor."""
    if isinstance(image, Tensor):
        return image
    return F.pil_to_tensor(image.convert("RGB") if image.mode != "RGB" else image)


def _flip(p: float, crop: Tensor) -> Tensor:
    # torchvision's RandomHorizontalFlip draws the same number: flip if torch.rand(1) < p
    return F.horizontal_flip(crop) if torch.rand(1) < p else crop


class CropPipeline:
    """Decoded image -> list of uint8 crops, by `ops` in order."""

    def __init__(self, ops: Sequence[CropOp]) -> None:
        self.ops = list(ops)

    def __call__(self, image: Image.Image | Tensor) -> list[Tensor]:
        crops: list[Any] = [image]  # PIL until an op makes tensors of it (a crop converts its box only)
        for op in self.ops:
            if isinstance(op, MultiCrop):
                if len(crops) != 1:
                    raise ValueError("multi-crop of an image that is already several crops")
                crops = [crop(crops[0]) for crop in op.crops]
            elif isinstance(op, Replicate):
                crops = [c for c in crops for _ in range(op.times)]
            elif isinstance(op, ResizedCrop):
                crops = [op(c) for c in crops]
            elif isinstance(op, Resize):
                crops = [op(to_uint8_tensor(c)) for c in crops]
            elif isinstance(op, HorizontalFlip):
                crops = [_flip(op.p, to_uint8_tensor(c)) for c in crops]
            else:
                raise TypeError(f"not a crop op: {op!r}")
        return [to_uint8_tensor(c) for c in crops]
