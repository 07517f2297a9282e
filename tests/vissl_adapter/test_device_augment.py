"""DATA.TRAIN.DEVICE_AUGMENTATION: the shipped recipes split as their configs
state, the loader's crops are VISSL's crops, what cannot be split is refused
before launch, and the batches reach the model augmented."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from convit_ssl.checkpoints import run_folder
from convit_ssl.data import photometric as P
from convit_ssl.vissl.configs import SSL_METHODS, compose
from convit_ssl.vissl.run.validate import validate
from convit_ssl.vissl.training import device_augment as D
from helpers import run_engine


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
        ("ColorJitter", (0.8,) * 12),
        ("Grayscale", (0.2,) * 12),
        ("GaussianBlur", (1.0, 0.1) + (0.5,) * 10),  # always on global crop 1, 0.1 on crop 2, 0.5 on local crops
        ("Solarize", (0.0, 0.2) + (0.0,) * 10),  # 0.2 on global crop 2 only
    ]
    assert plan.mean == (0.485, 0.456, 0.406) and plan.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize(
    "method, strength, blur, solarize",
    [
        ("simclr", 1.0, (0.5, 0.5), None),
        ("moco", 0.5, (0.5, 0.5), None),  # its flip comes after the blur: moved to the loader
        ("barlow_twins", 0.5, (1.0, 0.1), (0.0, 0.2)),
        ("deepclusterv2", 1.0, (0.5, 0.5), None),
        ("swav", 1.0, (0.5,) * 8, None),
    ],
)
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
    with pytest.raises(
        ValueError,
        match=r"TRANSFORMS\[4\] \('ImgPilRandomPhotometric'\) follows the photometric "
        r"transforms and cannot run on the training device",
    ):
        validate(config)
    config.DATA.TRAIN.DEVICE_AUGMENTATION = False  # VISSL's chain runs it
    validate(config)


def test_key_needs_the_task_and_a_known_collator():
    _, config = compose(
        ["config=test/convit_ssl/ssl/simclr_micro_synthetic", "config.TRAINER.TASK_NAME=self_supervision_task"]
    )
    with pytest.raises(ValueError, match=r"DEVICE_AUGMENTATION needs config.TRAINER.TASK_NAME=convit_ssl_task"):
        validate(config)
    _, config = compose(
        ["config=test/convit_ssl/ssl/simclr_micro_synthetic", "config.DATA.TRAIN.COLLATE_FUNCTION=siamese_collator"]
    )
    with pytest.raises(ValueError, match=r"collator 'siamese_collator' is not supported"):
        validate(config)


MULTICROP = [
    {
        "name": "ImgPilToMultiCrop",
        "total_num_crops": 6,
        "size_crops": [112, 48],
        "num_crops": [2, 4],
        "crop_scales": [[0.4, 1], [0.05, 0.4]],
    },
    {"name": "RandomHorizontalFlip", "p": 0.5},
]
DEIT = [
    {"name": "RandomResizedCrop", "size": 112, "interpolation": 3},
    {"name": "RandomHorizontalFlip"},
    {"name": "RandAugment", "magnitude": 9, "magnitude_std": 0.5, "increasing_severity": True},
]


@pytest.mark.parametrize("head, crops", [(MULTICROP, 6), (DEIT, 1)], ids=["dino", "deit"])
def test_loader_crops_are_vissls_crops_for_the_same_seed(monkeypatch, head, crops):
    """The loader's part (DINO's multi-crop + flip; the DeiT recipe's bicubic
    crop + flip on tensors, then RandAugment on PIL) on a photograph: the same
    crop boxes as VISSL's PIL chain for the same seed, and the same pixels up to
    the rounding of the resize (PIL's antialiased resize against torchvision's on uint8)."""
    import random

    from sklearn.datasets import load_sample_images
    from vissl.data.ssl_transforms import get_transform

    plan = D.plan(type("Train", (), {"TRANSFORMS": head + [{"name": "ToTensor"}]})())
    boxes = []
    get_params = T.RandomResizedCrop.get_params

    def recording(*args, **kwargs):
        boxes.append(get_params(*args, **kwargs))
        return boxes[-1]

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recording))
    image = Image.fromarray(load_sample_images().images[0])
    sample = lambda: {"data": [image], "label": [0], "data_valid": [1], "data_idx": [0]}  # noqa: E731

    def seeded(seed):
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)

    for seed in range(3):
        seeded(seed)
        theirs = get_transform(head)(sample())
        their_boxes, boxes[:] = list(boxes), []
        seeded(seed)
        ours = D.LoaderTransform(plan)(sample())
        assert boxes == their_boxes and len(boxes) == crops
        boxes.clear()
        assert ours["label"] == theirs["label"] == [0] * crops
        for crop, pil in zip(ours["data"], theirs["data"], strict=True):
            assert crop.dtype == torch.uint8
            reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
            # measured 0.0005-0.01 levels (torchvision's uint8 resize rounds as PIL's does, nearly always);
            # the same boxes with other RandAugment draws: 38-116 levels
            assert (crop.float() - reference).abs().mean() < 0.05


def loader(batches, augment, collator, num_crops, mixup=None):
    plan = D.Plan([], [], num_crops=num_crops)
    plan.augment = lambda: augment
    return D.DeviceAugmentedLoader(batches, plan, collator, torch.device("cpu"), lambda: 0, 0, 0, mixup)


def test_each_batch_of_one_iteration_gets_its_own_parameters():
    """A training step draws one batch per iteration (seeded by the iteration:
    a resumed run draws the same); several batches drawn at one iteration (a
    pass over the loader) differ; the loader's other attributes pass through."""
    augment = P.PhotometricAugment([P.Step(P.Solarize(), (1.0,))], (0,) * 3, (1,) * 3)
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(4, 3, 16, 16).contiguous()
    batches = [{"data": [images.clone()]} for _ in range(3)]
    iteration = [5]
    plan = D.Plan([], [], num_crops=1)
    plan.augment = lambda: augment
    wrapped = D.DeviceAugmentedLoader(batches, plan, "default_collate", torch.device("cpu"), lambda: iteration[0], 0, 0)
    assert len(wrapped) == 3 and wrapped.count([]) == 0  # list.count: an attribute of the wrapped loader
    first, second, _ = [b["data"][0] for b in wrapped]
    assert not torch.equal(first, second)
    again = next(
        iter(
            D.DeviceAugmentedLoader(
                [{"data": [images.clone()]}], plan, "default_collate", torch.device("cpu"), lambda: iteration[0], 0, 0
            )
        )
    )
    assert torch.equal(again["data"][0], first)


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
    out = next(iter(loader([batch], augment, collator, 2)))
    if collator == "multicrop_collator":
        views = out["data"][0]
    elif collator == "simclr_collator":
        views = out["data"][0].chunk(2)
    else:
        views = [out["data"][0], out["data_momentum"][0]]
    assert torch.allclose(views[0], torch.tensor(10 / 255)) and torch.allclose(views[1], torch.tensor(245 / 255))


# ---------------------------------------------------------------------------- the supervised DeiT recipe
def test_supervised_recipe_keeps_randaugment_in_the_loader():
    config = compose(["config=pretrain/supervised/supervised_convit_small_in1k_224_300ep"])[1]
    plan = D.plan(config.DATA.TRAIN)
    assert [t["name"] for t in plan.loader_transforms] == ["RandAugment"]
    crop, flip = plan.crop_ops
    assert crop.size == 224 and crop.interpolation.value == "bicubic" and flip.p == 0.5
    assert plan.steps == []
    (erasing,) = plan.after
    assert erasing.op == P.RandomErasing(value="random") and erasing.probs == (0.25,)
    train = D.loader_collator(config.DATA.TRAIN)
    assert train.COLLATE_FUNCTION == "default_collate" and config.DATA.TRAIN.COLLATE_FUNCTION == "cutmixup_collator"


def test_erasing_boxes_are_torchvisions_for_the_same_seed():
    op = P.RandomErasing()
    image = torch.zeros(3, 40, 56)
    for seed in range(20):
        torch.manual_seed(seed)
        top, left, h, w, _ = T.RandomErasing.get_params(image, op.scale, op.ratio, value=[0.0])
        ours = P._erasing_boxes(op, 1, (40, 56), torch.Generator().manual_seed(seed))
        assert ours[0].tolist() == [top, left, h, w]


def test_erasing_fills_its_box_with_noise_only():
    augment = P.PhotometricAugment([], (0,) * 3, (1,) * 3, after=[P.Step(P.RandomErasing(), (1.0,))])
    images = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    params = augment.draw(torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(0), (32, 32))
    out = augment.apply(images, params)
    for k, (top, left, h, w) in enumerate(params[0]["box"].tolist()):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[top : top + h, left : left + w] = True
        assert torch.all(out[k][:, ~inside] == 128 / 255)
        noise = out[k][:, inside]
        assert noise.numel() > 30 and abs(float(noise.mean())) < 0.5 and 0.6 < float(noise.std()) < 1.4


def test_mixup_on_the_device_equals_vissls_collator():
    """The same images and seeds: VISSL's cutmixup_collator on float crops (in
    the loader) and DeviceAugmentedBatches' mixing of the plainly collated uint8
    crops give the same inputs and soft targets."""
    from torch.utils.data import default_collate
    from vissl.data.collators.cutmixup_collator import cutmixup_collator

    params = {
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "prob": 1.0,
        "switch_prob": 0.5,
        "mode": "batch",
        "correct_lam": True,
        "label_smoothing": 0.1,
        "num_classes": 5,
    }
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)

    def samples(to):
        return [
            {"data": [to(images[i])], "label": [i % 5], "data_valid": [1], "data_idx": [i]}  # noqa
            for i in range(6)
        ]

    augment = P.PhotometricAugment([], (0,) * 3, (1,) * 3)
    for seed in range(6):  # mixup and cutmix both drawn
        np.random.seed(seed), torch.manual_seed(seed)
        theirs = cutmixup_collator(samples(lambda x: x.float() / 255), **params)
        np.random.seed(seed), torch.manual_seed(seed)
        ours = next(iter(loader([default_collate(samples(lambda x: x))], augment, "cutmixup_collator", 1, params)))
        assert torch.allclose(ours["data"][0], theirs["data"][0][0], atol=1e-6)
        assert torch.allclose(ours["label"][0], theirs["label"][0], atol=1e-6)


@pytest.mark.slow
def test_crops_and_normalisation_alone_train_the_same_weights_either_way(digits, tmp_path):
    """DINO's small-scale digits recipe has crops and normalisation only. With
    the key on, the loader crops on uint8 tensors and the device normalises;
    with it off, VISSL's PIL chain does both. Three iterations of real
    training end with the same trunk, bit for bit (the crops are the same
    pixels, and the device path draws nothing from the global generator that
    the crops and the model share)."""
    base = [
        "config=pretrain/dino/dino_convit_demo_digits_32",
        f"config.DATA.TRAIN.DATA_PATHS=[{digits / 'train'}]",
        f"config.DATA.TRAIN.LABEL_PATHS=[{digits / 'train'}]",
        "config.OPTIMIZER.num_epochs=1",
        "config.DATA.TRAIN.DATA_LIMIT=192",
        "config.LOSS.dino_loss.teacher_temp_warmup_iters=1",
        "config.LOG_FREQUENCY=1",
    ]
    trunks, losses = {}, {}
    for key in ("true", "false"):
        folder = tmp_path / key
        run_engine(
            [*base, f"config.DATA.TRAIN.DEVICE_AUGMENTATION={key}", f"config.CHECKPOINT.DIR={folder}"], cwd=tmp_path
        )
        losses[key] = run_folder.losses(folder)
        used = "DEVICE_AUGMENTATION: the loader makes 2 uint8 crops an image; on the cpu device: normalisation"
        assert (used in (folder / "log.txt").read_text()) == (key == "true")
        checkpoint = torch.load(run_folder.require_final_checkpoint(folder), weights_only=True)
        trunks[key] = checkpoint["classy_state_dict"]["base_model"]["model"]["trunk"]
    assert len(losses["true"]) == 3 and losses["true"] == losses["false"]
    assert trunks["true"].keys() == trunks["false"].keys()
    for name, weight in trunks["true"].items():
        assert torch.equal(weight, trunks["false"][name]), name
