"""Photometric augmentation of a batch of crops on the training device.

The self-supervised recipes' colour jitter (with hue), random greyscale,
Gaussian blur, solarisation and normalisation, applied to a whole batch of
uint8 crops after it reaches the device, each crop with its own random
parameters and its own probabilities (a recipe gives a probability per crop
position: DINO blurs global crop 1 always, crop 2 w.p. 0.1, local crops
w.p. 0.5). The kernels are kornia's; what is written here is the drawing of
the parameters and the bookkeeping of which crop gets which op.

Parameters are drawn on the CPU with an explicit `torch.Generator` (`draw`),
then applied on the images' device (`apply`): the draw is reproducible from
a seed, testable on its own, and tells the host which crops an op touches
without a device synchronisation.

Definitions (each the one VISSL's PIL transform uses, on [0, 1] floats
instead of 8-bit integers rounded after every op):

- `ColorJitter`: torchvision's, the four adjustments in a random order drawn
  per crop; factors uniform in [max(0, 1 - b), 1 + b] (brightness, contrast,
  saturation) and [-h, h] (hue, in turns).
- `Grayscale`: ITU-R 601 luma (PIL's `convert("L")`), copied to the 3 channels.
- `GaussianBlur`: standard deviation uniform in [sigma_min, sigma_max] pixels
  (PIL's `GaussianBlur(radius)` takes the radius as a standard deviation; it
  approximates the Gaussian by 3 box blurs), edges replicated as PIL does.
- `Solarize`: VISSL's `ImgPilRandomSolarize`: an integer threshold t uniform
  in {0, ..., 256}; values >= t (of 255) are inverted.
- `RandomErasing`: torchvision's, on the normalised crops (the supervised
  DeiT recipe), one crop at a time with torchvision's functional `erase`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ColorJitter:
    brightness: float
    contrast: float
    saturation: float
    hue: float

    def ranges(self) -> list[tuple[float, float]]:
        """The uniform ranges of the brightness, contrast, saturation and hue factors."""
        return [(max(0.0, 1 - f), 1 + f) for f in (self.brightness, self.contrast, self.saturation)] + [
            (-self.hue, self.hue)
        ]


@dataclass(frozen=True)
class Grayscale:
    pass


@dataclass(frozen=True)
class GaussianBlur:
    sigma_min: float
    sigma_max: float

    @property
    def kernel_size(self) -> int:
        """Odd, covering +-3 sigma of the widest blur (a 13-tap kernel for sigma 2)."""
        return 2 * math.ceil(3 * self.sigma_max) + 1


@dataclass(frozen=True)
class Solarize:
    max_threshold: int = 256


@dataclass(frozen=True)
class RandomErasing:
    """torchvision's RandomErasing on normalised crops: a box of area fraction in
    `scale` and aspect ratio in `ratio` (log-uniform), up to 10 tries to fit;
    filled with standard normal noise (``value="random"``) or `value`."""

    scale: tuple[float, float] = (0.02, 0.33)
    ratio: tuple[float, float] = (0.3, 3.3)
    value: float | str = "random"


Op = ColorJitter | Grayscale | GaussianBlur | Solarize | RandomErasing


@dataclass(frozen=True)
class Step:
    """An op and its probability for each crop position (index = position in the sample's crops)."""

    op: Op
    probs: tuple[float, ...]


def kornia() -> Any:
    """kornia, imported on first use: it costs about 0.5 s, which every VISSL
    command would pay for a key most CPU runs leave off; an optional
    dependency (the `vissl` extra), so its absence is said in one line."""
    try:
        # start-up: kornia takes 0.5 s to import, paid only where device augmentation is on
        import kornia as module
    except ImportError as e:
        raise ImportError("device-side augmentation needs kornia: pip install 'convit_ssl[vissl]' (or kornia)") from e
    return module


class PhotometricAugment:
    """The photometric tail of a recipe as batched ops.

    uint8 -> [0, 1], `steps` in order, normalisation by `mean` and `std` (per
    channel, of [0, 1] values), then `after` on the normalised crops
    (RandomErasing).
    """

    def __init__(
        self, steps: Sequence[Step], mean: Sequence[float], std: Sequence[float], after: Sequence[Step] = ()
    ) -> None:
        kornia()
        self.steps = list(steps)
        self.after = list(after)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if any(isinstance(step.op, RandomErasing) for step in self.steps) or any(
            not isinstance(step.op, RandomErasing) for step in self.after
        ):
            raise ValueError("RandomErasing runs after the normalisation, every other op before it")
        for step in self.steps + self.after:
            if any(not 0 <= p <= 1 for p in step.probs):
                raise ValueError(f"probabilities of {step.op} must be in [0, 1], got {step.probs}")

    @property
    def num_crops(self) -> int | None:
        """The number of crop positions every step has a probability for (None: no steps, any number)."""
        return min((len(step.probs) for step in self.steps + self.after), default=None)

    # ------------------------------------------------------------------ parameters (CPU)
    def draw(self, crop: Tensor, generator: torch.Generator, size: tuple[int, int] = (0, 0)) -> list[dict[str, Tensor]]:
        """Random parameters for crops at positions `crop` (N,) long, of `size`
        (H, W; for RandomErasing's boxes): per step, ``apply`` (N,) bool and
        the op's own parameters, all on the CPU."""
        crop = crop.cpu().long()
        if len(crop) and self.num_crops is not None and int(crop.max()) >= self.num_crops:
            raise ValueError(
                f"crop position {int(crop.max())} but the recipe gives probabilities for {self.num_crops} crops"
            )
        n = len(crop)
        params = []
        for step in self.steps + self.after:
            probs = torch.tensor(step.probs, dtype=torch.float64)[crop]
            drawn: dict[str, Tensor] = {"apply": torch.rand(n, generator=generator, dtype=torch.float64) < probs}
            if isinstance(step.op, ColorJitter):
                low, high = torch.tensor(step.op.ranges(), dtype=torch.float32).T
                drawn["factors"] = low + (high - low) * torch.rand(n, 4, generator=generator)
                drawn["order"] = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
            elif isinstance(step.op, GaussianBlur):
                u = torch.rand(n, generator=generator)
                drawn["sigma"] = step.op.sigma_min + (step.op.sigma_max - step.op.sigma_min) * u
            elif isinstance(step.op, Solarize):
                drawn["threshold"] = torch.randint(0, step.op.max_threshold + 1, (n,), generator=generator)
            elif isinstance(step.op, RandomErasing):
                drawn["box"] = _erasing_boxes(step.op, n, size, generator)
                drawn["apply"] &= drawn["box"][:, 2] > 0  # no box fitted in 10 tries: unchanged (torchvision)
                drawn["noise_seed"] = torch.randint(0, 2**62, (1,), generator=generator)
            params.append(drawn)
        return params

    # ------------------------------------------------------------------ application (any device)
    def apply(self, images: Tensor, params: list[dict[str, Tensor]]) -> Tensor:
        """Augment uint8 crops (N, 3, H, W) with `params` from `draw`; returns
        normalised float32 crops on the same device."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 crops (N, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        x = images.float().div_(255)
        if len(params) != len(self.steps) + len(self.after):
            raise ValueError(f"{len(params)} parameter sets for {len(self.steps) + len(self.after)} steps")
        for step, drawn in zip(self.steps, params, strict=False):
            if isinstance(step.op, ColorJitter):
                _color_jitter(x, drawn)
                continue
            idx = _indices(drawn["apply"], x.device)
            if idx is None:
                continue
            sub = x.index_select(0, idx)
            if isinstance(step.op, Grayscale):
                sub = kornia().color.rgb_to_grayscale(sub, rgb_weights=sub.new_tensor(LUMA)).expand(-1, 3, -1, -1)
            elif isinstance(step.op, GaussianBlur):
                sigma = drawn["sigma"][drawn["apply"]].to(x.device, non_blocking=True)
                k = step.op.kernel_size
                sub = kornia().filters.gaussian_blur2d(
                    sub, (k, k), torch.stack([sigma, sigma], dim=1), border_type="replicate"
                )
            elif isinstance(step.op, Solarize):
                t = drawn["threshold"][drawn["apply"]].to(x.device, non_blocking=True).float()
                # PIL compares the rounded 8-bit value with t: round(255 x) >= t <=> 255 x >= t - 0.5
                sub = kornia().enhance.solarize(sub, thresholds=(t - 0.5) / 255)
            x.index_copy_(0, idx, sub.contiguous())
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        x = x.sub_(mean).div_(std)
        for step, drawn in zip(self.after, params[len(self.steps) :], strict=True):
            _erase(x, step.op, drawn)
        return x

    def __call__(self, images: Tensor, crop: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(images, self.draw(crop, generator, tuple(images.shape[-2:])))


def _indices(mask: Tensor, device: torch.device) -> Tensor | None:
    """The positions where the CPU `mask` is true, on `device` (None if none)."""
    idx = mask.nonzero().flatten()
    return idx.to(device, non_blocking=True) if len(idx) else None


def _erasing_boxes(op: RandomErasing, n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """(N, 4) boxes (top, left, height, width) by torchvision's RandomErasing.get_params;
    height 0 where none fitted in 10 tries."""
    height, width = size
    area = height * width
    low, high = (math.log(r) for r in op.ratio)
    boxes = torch.zeros(n, 4, dtype=torch.long)
    for k in range(n):
        for _ in range(10):
            erase_area = area * torch.empty(1).uniform_(op.scale[0], op.scale[1], generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(low, high, generator=generator).item())
            h, w = int(round(math.sqrt(erase_area * aspect))), int(round(math.sqrt(erase_area / aspect)))
            if h < height and w < width:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                boxes[k] = torch.tensor([top, left, h, w])
                break
    return boxes


def _erase(x: Tensor, op: RandomErasing, drawn: dict[str, Tensor]) -> None:
    """In place: each selected crop's box filled with noise (from one device
    generator seeded by the draw) or `op.value`; torchvision's functional erase."""
    selected = drawn["apply"].nonzero().flatten().tolist()
    if not selected:
        return
    generator = torch.Generator(device=x.device).manual_seed(int(drawn["noise_seed"]))
    for k in selected:
        top, left, h, w = drawn["box"][k].tolist()
        if op.value == "random":
            value = torch.randn((x.shape[1], h, w), generator=generator, device=x.device, dtype=x.dtype)
        else:
            value = torch.tensor(float(op.value), device=x.device, dtype=x.dtype)
        x[k] = TF.erase(x[k], top, left, h, w, value)


def _jitter_fns():
    """torchvision's four colour adjustments, as kornia implements them (hue in turns)."""
    enhance = kornia().enhance
    return (
        enhance.adjust_brightness_accumulative,
        enhance.adjust_contrast_with_mean_subtraction,
        enhance.adjust_saturation_with_gray_subtraction,
        lambda img, f: enhance.adjust_hue(img, f * 2 * math.pi),
    )


def _color_jitter(x: Tensor, drawn: dict[str, Tensor]) -> None:
    """In place: each selected crop gets its four adjustments in its own order.
    At order position j, adjustment a runs on the crops whose j-th is a: 16
    index groups, together 4 adjustments per crop."""
    fns = _jitter_fns()
    for j in range(4):
        for a, fn in enumerate(fns):
            mask = drawn["apply"] & (drawn["order"][:, j] == a)
            idx = _indices(mask, x.device)
            if idx is None:
                continue
            factor = drawn["factors"][mask, a].to(x.device, non_blocking=True)
            x.index_copy_(0, idx, fn(x.index_select(0, idx), factor).clamp_(0, 1).contiguous())
