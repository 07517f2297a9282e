"""The batched photometric ops (convit_ssl.data.photometric) are VISSL's PIL
augmentation: each op with fixed parameters against torchvision's op on the PIL
image VISSL uses (scikit-learn's two photographs, 427 x 640), and the random
draws against the distributions the recipes state.

Tolerances are in 8-bit levels (of 255), and the reasons for them:
- pointwise ops (brightness, contrast, saturation, greyscale, solarisation):
  PIL works on 8-bit integers and rounds each result, the batched ops on
  floats: at most 1.5 levels apart, 0.6 on average (solarisation: the same values);
- hue: PIL converts through 8-bit HSV, so hue is quantised to 1/256 of a turn:
  0.01 % of the pixels (near grey, where hue is ill-defined) differ by up to
  7 levels, 0.6 on average; the float definition equals torchvision's tensor
  op to 1e-5;
- blur: PIL's GaussianBlur(radius) approximates a Gaussian of standard
  deviation `radius` by three box blurs: 0.6 levels apart on average, at most
  4 for 99.9 % of the pixels (the rest at the image border, where PIL's box
  passes and a Gaussian kernel weigh the replicated edge differently).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from scipy import stats

P = pytest.importorskip("convit_ssl.data.photometric")


@pytest.fixture(scope="module")
def photographs():
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def levels(ours: torch.Tensor, pil: Image.Image) -> torch.Tensor:
    """|ours - PIL| in 8-bit levels."""
    return (ours - as_tensor(pil).float() / 255).abs() * 255


def quantile(d: torch.Tensor, q: float) -> float:
    return float(d.flatten().kthvalue(int(d.numel() * q)).values)


def run(op, params, image):
    """One op on one image with fixed parameters, no normalisation."""
    augment = P.PhotometricAugment([P.Step(op, (1.0,))], (0, 0, 0), (1, 1, 1))
    return augment.apply(as_tensor(image)[None], [{"apply": torch.tensor([True]), **params}])[0]


JITTER = P.ColorJitter(0.4, 0.4, 0.4, 0.1)


def jitter(which: int, factor: float):
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    factors[0, which] = factor
    return {"factors": factors, "order": torch.tensor([[0, 1, 2, 3]])}


@pytest.mark.parametrize(
    "which, factor, reference",
    [
        (0, 1.3, TF.adjust_brightness),
        (0, 0.6, TF.adjust_brightness),
        (1, 1.5, TF.adjust_contrast),
        (1, 0.5, TF.adjust_contrast),
        (2, 1.6, TF.adjust_saturation),
        (2, 0.3, TF.adjust_saturation),
    ],
)
def test_jitter_equals_torchvision_on_pil(photographs, which, factor, reference):
    for image in photographs:
        d = levels(run(JITTER, jitter(which, factor), image), reference(image, factor))
        assert d.max() <= 1.5 and d.mean() <= 0.6, (float(d.max()), float(d.mean()))


@pytest.mark.parametrize("hue", [0.08, -0.1, 0.02])
def test_hue_equals_torchvision(photographs, hue):
    for image in photographs:
        ours = run(JITTER, jitter(3, hue), image)
        float_reference = TF.adjust_hue(as_tensor(image).float() / 255, hue)
        assert (ours - float_reference).abs().max() < 1e-5
        d = levels(ours, TF.adjust_hue(image, hue))
        assert d.mean() <= 0.6 and quantile(d, 0.999) <= 7, (float(d.mean()), quantile(d, 0.999))


def test_greyscale_is_pils(photographs):
    for image in photographs:
        d = levels(run(P.Grayscale(), {}, image), image.convert("L").convert("RGB"))
        assert d.max() <= 1.5 and d.mean() <= 0.6


@pytest.mark.parametrize("radius", [0.1, 0.5, 1.0, 2.0])
def test_blur_sigma_is_pils_radius(photographs, radius):
    for image in photographs:
        ours = run(P.GaussianBlur(0.1, 2.0), {"sigma": torch.tensor([radius])}, image)
        d = levels(ours, image.filter(ImageFilter.GaussianBlur(radius)))
        assert d.mean() <= 0.6 and quantile(d, 0.999) <= 4, (float(d.mean()), quantile(d, 0.999))


@pytest.mark.parametrize("threshold", [0, 1, 100, 128, 255, 256])
def test_solarize_is_pils(photographs, threshold):
    for image in photographs:
        d = levels(
            run(P.Solarize(), {"threshold": torch.tensor([threshold])}, image), ImageOps.solarize(image, threshold)
        )
        assert d.max() < 1e-3  # the same 8-bit values, up to float rounding


def test_each_crop_gets_its_own_order_and_factors(photographs):
    """A jitter order drawn per crop: two crops of one image with the same
    factors in different orders differ (brightness then contrast is not contrast
    then brightness), and each equals torchvision's ops in its own order."""
    image = as_tensor(photographs[0])
    factors = torch.tensor([[1.4, 0.5, 1.0, 0.0]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])
    out = P.PhotometricAugment([P.Step(JITTER, (1.0,))], (0, 0, 0), (1, 1, 1)).apply(
        torch.stack([image, image]), [{"apply": torch.tensor([True, True]), "factors": factors, "order": order}]
    )
    x = image.float() / 255
    first = TF.adjust_contrast(TF.adjust_brightness(x, 1.4), 0.5)
    second = TF.adjust_brightness(TF.adjust_contrast(x, 0.5), 1.4)
    assert (out[0] - first).abs().max() < 1e-4 and (out[1] - second).abs().max() < 1e-4
    assert (first - second).abs().max() > 0.05


def test_normalisation(photographs):
    image = as_tensor(photographs[1])[None]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = P.PhotometricAugment([], mean, std).apply(image, [])
    expected = TF.normalize(image.float() / 255, mean, std)
    assert torch.allclose(out, expected, atol=1e-6)


# ---------------------------------------------------------------------------- the draws
DINO_BLUR = (1.0, 0.1) + (0.5,) * 10
DINO_SOLARIZE = (0.0, 0.2) + (0.0,) * 10


@pytest.fixture(scope="module")
def dino_draws():
    """20,000 crops of DINO's recipe (12 positions) drawn at once."""
    steps = [
        P.Step(P.ColorJitter(0.4, 0.4, 0.2, 0.1), (0.8,) * 12),
        P.Step(P.Grayscale(), (0.2,) * 12),
        P.Step(P.GaussianBlur(0.1, 2.0), DINO_BLUR),
        P.Step(P.Solarize(), DINO_SOLARIZE),
    ]
    crop = torch.arange(24_000) % 12
    return crop, P.PhotometricAugment(steps, (0, 0, 0), (1, 1, 1)).draw(crop, torch.Generator().manual_seed(0))


def test_probabilities_per_crop_position(dino_draws):
    """Each op fires at each crop position with the recipe's probability: a
    binomial z-score below 4.5 (2,000 draws a position; a wrong probability of
    0.1 would be off by more than 10)."""
    crop, params = dino_draws
    for step, probs in enumerate([(0.8,) * 12, (0.2,) * 12, DINO_BLUR, DINO_SOLARIZE]):
        for position, p in enumerate(probs):
            fired = params[step]["apply"][crop == position].double()
            if p in (0.0, 1.0):
                assert fired.mean() == p
                continue
            z = (fired.mean() - p) / (p * (1 - p) / len(fired)) ** 0.5
            assert abs(z) < 4.5, (step, position, float(fired.mean()), p)


def test_parameter_distributions(dino_draws):
    """Factors uniform on torchvision's ranges and thresholds on {0..256}
    (Kolmogorov-Smirnov and chi-square, p > 1e-4), every one of the 24 jitter
    orders equally likely (chi-square, p > 1e-4)."""
    _, params = dino_draws
    factors = params[0]["factors"]
    for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert stats.kstest(factors[:, column].numpy(), stats.uniform(low, high - low).cdf).pvalue > 1e-4
    sigma = params[2]["sigma"].numpy()
    assert stats.kstest(sigma, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-4
    counts = np.bincount(params[3]["threshold"].numpy(), minlength=257)
    assert len(counts) == 257 and stats.chisquare(counts).pvalue > 1e-4
    orders = {perm: i for i, perm in enumerate(itertools.permutations(range(4)))}
    seen = np.bincount([orders[tuple(row)] for row in params[0]["order"].tolist()], minlength=24)
    assert stats.chisquare(seen).pvalue > 1e-4


def test_draws_are_reproducible_and_independent_of_the_device():
    steps = [P.Step(JITTER, (0.8,)), P.Step(P.GaussianBlur(0.1, 2.0), (0.5,))]
    augment = P.PhotometricAugment(steps, (0.5,) * 3, (0.25,) * 3)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    crop = torch.zeros(6, dtype=torch.long)
    first = augment(images, crop, torch.Generator().manual_seed(3))
    assert torch.equal(first, augment(images, crop, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, augment(images, crop, torch.Generator().manual_seed(4)))


def test_bad_input_is_refused():
    augment = P.PhotometricAugment([P.Step(P.Grayscale(), (0.2, 0.2))], (0,) * 3, (1,) * 3)
    with pytest.raises(ValueError, match="expected uint8 crops"):
        augment.apply(torch.zeros(2, 3, 8, 8), augment.draw(torch.zeros(2, dtype=torch.long), torch.Generator()))
    with pytest.raises(ValueError, match="crop position 2 but the recipe gives probabilities for 2 crops"):
        augment.draw(torch.tensor([0, 2]), torch.Generator())
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        P.PhotometricAugment([P.Step(P.Grayscale(), (1.5,))], (0,) * 3, (1,) * 3)


def test_normalisation_alone_takes_any_number_of_crops():
    augment = P.PhotometricAugment([], (0.5,) * 3, (0.5,) * 3)
    out = augment(torch.full((3, 3, 4, 4), 255, dtype=torch.uint8), torch.tensor([0, 5, 11]), torch.Generator())
    assert torch.allclose(out, torch.ones(3, 3, 4, 4))
