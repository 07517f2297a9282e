"""DATA.TRAIN.DEVICE_AUGMENTATION: the shipped recipes split as their configs
state, the loader's crops are VISSL's crops, what cannot be split is refused
before launch, and the batches reach the model augmented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from convit_ssl.data import photometric as P
from convit_ssl.vissl import device_augment as D
from convit_ssl.vissl.configs import SSL_METHODS, compose
from convit_ssl.vissl.validate import validate


def recipe(method: str):
    return compose([f"config=pretrain/{SSL_METHODS[method]}/{method}_convit_small_in1k_224_300ep"])[1]


def steps_of(plan):
    return [(type(step.op).__name__, step.probs) for step in plan.steps]


def test_dino_recipe_splits_as_its_config_states():
    config = recipe("dino")
    assert D.enabled(config) and config.TRAINER.TASK_NAME == "convit_ssl_task"
    plan = D.plan(config.DATA.TRAIN)
    assert plan.num_crops == 12 and not plan.loader_transforms
    (multicrop, flip) = plan.crop_ops
    assert [c.size for c in multicrop.crops] == [224] * 2 + [96] * 10
    assert [c.scale for c in multicrop.crops] == [(0.4, 1)] * 2 + [(0.05, 0.4)] * 10
    assert flip.p == 0.5
    assert plan.steps[0].op == P.ColorJitter(0.4, 0.4, 0.4, 0.1)  # strength 0.5
    assert steps_of(plan) == [
        ("ColorJitter", (0.8,) * 12), ("Grayscale", (0.2,) * 12),
        ("GaussianBlur", (1.0, 0.1) + (0.5,) * 10),   # always on global crop 1, 0.1 on crop 2, 0.5 on local crops
        ("Solarize", (0.0, 0.2) + (0.0,) * 10),       # 0.2 on global crop 2 only
    ]
    assert plan.mean == (0.485, 0.456, 0.406) and plan.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("method, strength, blur, solarize", [
    ("simclr", 1.0, (0.5, 0.5), None),
    ("moco", 0.5, (0.5, 0.5), None),            # its flip comes after the blur: moved to the loader
    ("barlow_twins", 0.5, (1.0, 0.1), (0.0, 0.2)),
    ("deepclusterv2", 1.0, (0.5, 0.5), None),
    ("swav", 1.0, (0.5,) * 8, None),
])
def test_other_recipes_split(method, strength, blur, solarize):
    plan = D.plan(recipe(method).DATA.TRAIN)
    s = 0.8 * strength
    assert plan.steps[0].op == P.ColorJitter(s, s, s, 0.2 * strength)
    expected = [("ColorJitter", (0.8,) * len(blur)), ("Grayscale", (0.2,) * len(blur)), ("GaussianBlur", blur)]
    assert steps_of(plan) == expected + ([("Solarize", solarize)] if solarize else [])
    assert any(type(op).__name__ == "HorizontalFlip" for op in plan.crop_ops)


def _micro_with(transform: dict, position: int = 4):
    _, config = compose(["config=test/convit_ssl/ssl/simclr_micro_synthetic"])
    config.DATA.TRAIN.TRANSFORMS.insert(position, transform)
    return config


def test_unsplittable_transform_is_refused_before_launch():
    config = _micro_with({"name": "ImgPilRandomPhotometric", "p": 0.5})
    with pytest.raises(ValueError, match=r"TRANSFORMS\[4\] \('ImgPilRandomPhotometric'\) follows the photometric "
                                         r"transforms and cannot run on the training device"):
        validate(config)
    config.DATA.TRAIN.DEVICE_AUGMENTATION = False  # VISSL's chain runs it
    validate(config)


def test_key_needs_the_task_and_a_known_collator():
    _, config = compose(["config=test/convit_ssl/ssl/simclr_micro_synthetic",
                         "config.TRAINER.TASK_NAME=self_supervision_task"])
    with pytest.raises(ValueError, match=r"DEVICE_AUGMENTATION needs config.TRAINER.TASK_NAME=convit_ssl_task"):
        validate(config)
    _, config = compose(["config=test/convit_ssl/ssl/simclr_micro_synthetic",
                         "config.DATA.TRAIN.COLLATE_FUNCTION=siamese_collator"])
    with pytest.raises(ValueError, match=r"collator 'siamese_collator' is not supported"):
        validate(config)


def test_loader_crops_are_vissls_crops_for_the_same_seed(monkeypatch):
    """DINO's loader part (multi-crop + flip) on a photograph: the same crop
    boxes as VISSL's PIL chain for the same seed, and the same pixels up to
    the resize (PIL's antialiased bilinear against torchvision's on uint8)."""
    from sklearn.datasets import load_sample_images
    from vissl.data.ssl_transforms import get_transform

    head = [{"name": "ImgPilToMultiCrop", "total_num_crops": 6, "size_crops": [112, 48], "num_crops": [2, 4],
             "crop_scales": [[0.4, 1], [0.05, 0.4]]}, {"name": "RandomHorizontalFlip", "p": 0.5}]
    tail = [{"name": "ToTensor"}]
    plan = D.plan(type("Train", (), {"TRANSFORMS": head + tail})())
    boxes = []
    get_params = T.RandomResizedCrop.get_params

    def recording(*args, **kwargs):
        boxes.append(get_params(*args, **kwargs))
        return boxes[-1]

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recording))
    image = Image.fromarray(load_sample_images().images[0])
    sample = lambda: {"data": [image], "label": [0], "data_valid": [1], "data_idx": [0]}  # noqa: E731
    for seed in range(3):
        torch.manual_seed(seed)
        theirs = get_transform(head)(sample())
        their_boxes, boxes[:] = list(boxes), []
        torch.manual_seed(seed)
        ours = D.LoaderTransform(plan)(sample())
        assert boxes == their_boxes and len(boxes) == 6
        boxes.clear()
        assert ours["label"] == theirs["label"] == [0] * 6
        for crop, pil in zip(ours["data"], theirs["data"], strict=True):
            assert crop.dtype == torch.uint8
            reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
            assert (crop.float() - reference).abs().mean() < 2.0  # a wrong flip or box: tens of levels


@pytest.mark.parametrize("collator", ["multicrop_collator", "simclr_collator", "moco_collator"])
def test_batches_are_augmented_by_crop_position(collator):
    """Each collator's layout: the crops at position 1 get the op with
    probability 1, those at position 0 never (solarize at threshold 0 inverts)."""
    augment = P.PhotometricAugment([P.Step(P.Solarize(max_threshold=0), (0.0, 1.0))], (0,) * 3, (1,) * 3)
    images = [torch.full((3, 3, 8, 8), 10, dtype=torch.uint8) for _ in range(2)]
    if collator == "multicrop_collator":
        batch = {"data": [list(images)]}
    elif collator == "simclr_collator":
        batch = {"data": [torch.cat(images)]}
    else:
        batch = {"data": [images[0]], "data_momentum": [images[1]]}
    out = next(D.DeviceAugmentedBatches(iter([batch]), augment, collator, 2, torch.device("cpu"), lambda: 0))
    if collator == "multicrop_collator":
        views = out["data"][0]
    elif collator == "simclr_collator":
        views = out["data"][0].chunk(2)
    else:
        views = [out["data"][0], out["data_momentum"][0]]
    assert torch.allclose(views[0], torch.tensor(10 / 255)) and torch.allclose(views[1], torch.tensor(245 / 255))
