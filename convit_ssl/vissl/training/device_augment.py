"""`DATA.TRAIN.DEVICE_AUGMENTATION`: a recipe's photometric augmentation on
the training device instead of in the data-loader workers.

With the key on, the training transforms (`DATA.TRAIN.TRANSFORMS`, as the
user wrote them) are split once by `plan()`:

- the loader does what must happen per image on the CPU: decode, resizes,
  the random resized crops (ImgPilToMultiCrop, ImgReplicatePil,
  RandomResizedCrop) and flips, on uint8 tensors (`convit_ssl.data.crops`);
  another per-image transform among them (RandAugment, ...) runs from there
  on with VISSL's own transforms, on PIL images of the crops. The collator
  gets uint8 crops.
- the training device does the rest, batched, right after the batch reaches
  it (`convit_ssl.data.photometric`): ImgPilColorDistortion,
  ImgPilGaussianBlur, ImgPilRandomSolarize, ImgPilMultiCropRandomApply (of
  one of those), ToTensor, Normalize, then RandomErasing and the mixup /
  cutmix of `cutmixup_collator` (VISSL's own Mixup, on the device's batch;
  the loader then collates plainly). A flip written among them moves to the
  loader (it commutes with every one of them).

Anything else after the crops cannot be split and is refused before launch,
with its name. `convit_ssl_task` does the wiring (`ConViTSSLTask`): the train
dataset's transform, and the train loader wrapped in `DeviceAugmentedLoader`.
Parameters are drawn from a generator seeded by (SEED_VALUE, rank,
iteration): a resumed run draws what it would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from convit_ssl.data import crops as C
from convit_ssl.data import photometric as P

KEY = "DEVICE_AUGMENTATION"

# torchvision's integer interpolation codes, as a VISSL config writes them
_INTERPOLATION = {0: C.InterpolationMode.NEAREST, 2: C.InterpolationMode.BILINEAR, 3: C.InterpolationMode.BICUBIC}
_CROPS = ("Resize", "ImgPilToMultiCrop", "ImgReplicatePil", "RandomResizedCrop")
_DEVICE = (
    "ImgPilColorDistortion",
    "ImgPilGaussianBlur",
    "ImgPilRandomSolarize",
    "ImgPilMultiCropRandomApply",
    "ToTensor",
    "Normalize",
    "RandomErasing",
)
# collators whose batch layout `crop_groups` knows; cutmixup_collator's mixing moves to the device
# (the loader then collates with default_collate)
COLLATORS = ("multicrop_collator", "simclr_collator", "moco_collator", "default_collate", "cutmixup_collator")
MIXUP = "cutmixup_collator"


def enabled(config: Any) -> bool:
    """Whether a run's config turns device-side augmentation on."""
    return bool(config.DATA.TRAIN.get(KEY, False))


@dataclass
class Plan:
    """A recipe's transforms split between the loader and the training device."""

    loader_transforms: list[dict[str, Any]]  # after crop_ops: VISSL's transforms on PIL images (may be [])
    crop_ops: list[Any]  # first: crops, resizes and flips on uint8 tensors
    steps: list[P.Step] = field(default_factory=list)
    after: list[P.Step] = field(default_factory=list)  # on the normalised crops
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    num_crops: int = 1

    def augment(self) -> P.PhotometricAugment:
        return P.PhotometricAugment(self.steps, self.mean, self.std, self.after)

    def crop_sizes(self) -> list[int | None]:
        """The side of the crop at each position (None where the loader's part does not fix it)."""
        sizes: list[int | None] = [None]
        for op in self.crop_ops:
            if isinstance(op, C.MultiCrop):
                sizes = [crop.size for crop in op.crops]
            elif isinstance(op, C.Replicate):
                sizes = sizes * op.times
            elif isinstance(op, C.ResizedCrop):
                sizes = [op.size] * len(sizes)
        return sizes


def _where(i: int, transform: dict[str, Any]) -> str:
    return f"config.DATA.TRAIN.TRANSFORMS[{i}] ({transform.get('name')!r})"


def _crop_op(name: str, args: dict[str, Any], where: str) -> Any:
    try:
        if name == "ImgPilToMultiCrop":
            sizes, counts, scales = args["size_crops"], args["num_crops"], args["crop_scales"]
            if sum(counts) != args.get("total_num_crops", sum(counts)):
                raise ValueError(f"total_num_crops {args['total_num_crops']} != sum of num_crops {counts}")
            return C.MultiCrop(
                tuple(
                    C.ResizedCrop(int(size), tuple(scale))
                    for size, count, scale in zip(sizes, counts, scales, strict=True)
                    for _ in range(count)
                )
            )
        if name == "Resize":
            return C.Resize(args["size"], _INTERPOLATION[int(args.get("interpolation", 2))])
        if name == "ImgReplicatePil":
            return C.Replicate(int(args.get("num_times", 2)))
        if name == "RandomResizedCrop":
            size = args["size"]
            return C.ResizedCrop(
                int(size if isinstance(size, int) else size[0]),
                tuple(args.get("scale", (0.08, 1.0))),
                tuple(args.get("ratio", C.RATIO)),
                _INTERPOLATION[int(args.get("interpolation", 2))],
            )
        return C.HorizontalFlip(float(args.get("p", 0.5)))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: cannot read its arguments {args} ({e})") from e


def _steps(name: str, args: dict[str, Any], num_crops: int, where: str) -> list[P.Step]:
    """The device steps of one photometric transform of VISSL's."""
    every = lambda p: (float(p),) * num_crops  # noqa: E731
    if name == "ImgPilColorDistortion":  # SimCLR's: jitter w.p. 0.8, then greyscale w.p. 0.2
        s = float(args.get("strength", 1.0))
        return [
            P.Step(P.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), every(0.8)),
            P.Step(P.Grayscale(), every(0.2)),
        ]
    if name == "ImgPilGaussianBlur":
        return [
            P.Step(
                P.GaussianBlur(float(args.get("radius_min", 0.1)), float(args.get("radius_max", 2.0))),
                every(args.get("p", 0.5)),
            )
        ]
    if name == "ImgPilRandomSolarize":
        return [P.Step(P.Solarize(), every(args.get("p", 0.66)))]
    if name == "ImgPilMultiCropRandomApply":
        inner, prob = list(args.get("transforms", [])), list(args.get("prob", []))
        if len(prob) != num_crops:
            raise ValueError(f"{where}: {len(prob)} probabilities for {num_crops} crops")
        if len(inner) != 1 or inner[0].get("name") not in ("ImgPilGaussianBlur", "ImgPilRandomSolarize"):
            raise ValueError(
                f"{where}: on the training device it takes one ImgPilGaussianBlur or "
                f"ImgPilRandomSolarize, got {[t.get('name') for t in inner]}"
            )
        (step,) = _steps(inner[0]["name"], dict(inner[0]), num_crops, where)
        return [P.Step(step.op, tuple(float(p) * q for p, q in zip(prob, step.probs)))]
    raise AssertionError(name)


def plan(train: Any) -> Plan:
    """Split a DATA.TRAIN block's TRANSFORMS; ValueError naming the transform
    that cannot be split."""
    transforms = [dict(t) for t in train.TRANSFORMS]
    names = [t.get("name") for t in transforms]
    first = next((i for i, n in enumerate(names) if n in _DEVICE), None)
    if first is None or "ToTensor" not in names[first:]:
        raise ValueError(
            f"config.DATA.TRAIN.{KEY}: the transforms {names} have no photometric part ending in "
            f"ToTensor to run on the training device; expected some of {', '.join(_DEVICE)}"
        )
    for i, t in enumerate(transforms):
        if t.get("indices") is not None or t.get("transform_type") is not None:
            raise ValueError(f"{_where(i, t)}: 'indices' / 'transform_type' are not supported with {KEY}")
    head = [(i, t) for i, t in enumerate(transforms[:first])]
    tail = [(i, t) for i, t in enumerate(transforms) if i >= first]
    # flips commute with every device op: they run in the loader, in their place among the crops
    head += [(i, t) for i, t in tail if t["name"] == "RandomHorizontalFlip"]
    tail = [(i, t) for i, t in tail if t["name"] != "RandomHorizontalFlip"]
    for i, t in tail:
        if t["name"] not in _DEVICE:
            raise ValueError(
                f"{_where(i, t)} follows the photometric transforms and cannot run on the training "
                f"device ({KEY}); supported there: {', '.join(_DEVICE)}, RandomHorizontalFlip"
            )
    # the loader's part: its leading crops and flips on uint8 tensors, from the first other
    # transform on (RandAugment, say) VISSL's own transforms on PIL images of the crops
    on_tensors = next((k for k, (_, t) in enumerate(head) if not _tensor_capable(t)), len(head))
    crop_ops = [_crop_op(t["name"], t, _where(i, t)) for i, t in head[:on_tensors]]
    result = Plan([t for _, t in head[on_tensors:]], crop_ops, num_crops=_num_crops([t for _, t in head]))
    for i, t in tail:
        name = t["name"]
        if name == "Normalize":
            result.mean, result.std = tuple(t["mean"]), tuple(t["std"])
        elif name == "RandomErasing":
            if "Normalize" not in [u["name"] for j, u in tail if j < i]:
                raise ValueError(f"{_where(i, t)}: with {KEY} it runs after Normalize (as the recipes have it)")
            op = P.RandomErasing(
                tuple(t.get("scale", (0.02, 0.33))), tuple(t.get("ratio", (0.3, 3.3))), t.get("value", 0)
            )
            result.after.append(P.Step(op, (float(t.get("p", 0.5)),) * result.num_crops))
        elif name != "ToTensor":
            result.steps += _steps(name, t, result.num_crops, _where(i, t))
    ending = [t["name"] for _, t in tail if t["name"] != "RandomErasing"][-2:]
    if ending not in (["ToTensor", "Normalize"], ["ToTensor"]):
        raise ValueError(
            f"config.DATA.TRAIN.TRANSFORMS: with {KEY} the photometric part must end in ToTensor "
            f"(then Normalize, RandomErasing), got {[t['name'] for _, t in tail]}"
        )
    return result


def _tensor_capable(transform: dict[str, Any]) -> bool:
    return transform["name"] in _CROPS + ("RandomHorizontalFlip",) and isinstance(transform.get("size", 0), int)


def _num_crops(head: Sequence[dict[str, Any]]) -> int:
    count = 1
    for t in head:
        if t["name"] == "ImgPilToMultiCrop":
            count = int(sum(t["num_crops"]))
        elif t["name"] == "ImgReplicatePil":
            count *= int(t.get("num_times", 2))
    return count


def validate(config: Any, task_name: str) -> None:
    """Pre-launch checks of a run with the key on (a no-op with it off)."""
    if not enabled(config):
        return
    train = config.DATA.TRAIN
    if config.TRAINER.TASK_NAME != task_name:
        raise ValueError(
            f"config.DATA.TRAIN.{KEY} needs config.TRAINER.TASK_NAME={task_name} "
            f"(got {config.TRAINER.TASK_NAME!r}, which would ignore it)"
        )
    if len(train.DATA_SOURCES) != 1:
        raise ValueError(f"config.DATA.TRAIN.{KEY} takes one data source, got {list(train.DATA_SOURCES)}")
    if train.COLLATE_FUNCTION not in COLLATORS:
        raise ValueError(
            f"config.DATA.TRAIN.{KEY}: collator {train.COLLATE_FUNCTION!r} is not supported; "
            f"valid: {', '.join(COLLATORS)}"
        )
    if train.COLLATE_FUNCTION == MIXUP and train.COLLATE_FUNCTION_PARAMS.get("ssl_method"):
        raise ValueError(f"config.DATA.TRAIN.{KEY}: {MIXUP} with ssl_method is not supported")
    P.kornia()
    plan(train)


class LoaderTransform:
    """The loader's part, as a VISSL dataset transform: the sample's image ->
    its uint8 crops (``sample["data"]`` becomes the list of crops)."""

    def __init__(self, plan_: Plan) -> None:
        from vissl.data.ssl_transforms import get_transform  # VISSL's own transforms, for a part they run

        self.crops = C.CropPipeline(plan_.crop_ops)
        self.pil = get_transform(plan_.loader_transforms) if plan_.loader_transforms else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        (image,) = sample["data"]
        crops = self.crops(image)
        for key in ("label", "data_valid", "data_idx"):  # one entry per crop, as VISSL's copies give
            if key in sample and len(sample[key]) == 1:
                sample[key] = sample[key] * len(crops)
        if self.pil is None:
            sample["data"] = crops
            return sample
        sample["data"] = [Image.fromarray(crop.permute(1, 2, 0).numpy()) for crop in crops]
        sample = self.pil(sample)
        sample["data"] = [C.to_uint8_tensor(image) for image in sample["data"]]
        return sample


def loader_collator(train: Any) -> Any:
    """The DATA.TRAIN block the loader is built from: `train` itself, or for
    the mixup collator a copy that collates plainly (the mixing runs on the device)."""
    if train.COLLATE_FUNCTION != MIXUP:
        return train
    copy = deepcopy(train)
    copy.COLLATE_FUNCTION, copy.COLLATE_FUNCTION_PARAMS = "default_collate", {}
    return copy


def crop_groups(batch: dict[str, Any], collator: str, num_crops: int) -> list[tuple[str, int, Tensor, Tensor]]:
    """The collated batch's image tensors as (key, index in its list, uint8
    tensor, crop position of each row)."""
    if collator == "multicrop_collator":
        return [("data", k, t, torch.full((len(t),), k)) for k, t in enumerate(batch["data"][0])]
    if collator == "moco_collator":
        return [
            ("data", 0, batch["data"][0], torch.zeros(len(batch["data"][0]), dtype=torch.long)),
            (
                "data_momentum",
                0,
                batch["data_momentum"][0],
                torch.ones(len(batch["data_momentum"][0]), dtype=torch.long),
            ),
        ]
    images = batch["data"][0]
    per_view = len(images) // num_crops  # simclr_collator: view-major, [img1_0, img2_0, ..., img1_1, ...]
    return [("data", 0, images, torch.arange(len(images)) // max(per_view, 1))]


class DeviceAugmentedLoader:
    """A train DataLoader whose batches come out on `device`, augmented: what
    every consumer of the task's train loader sees (the train step's iterator,
    DeepCluster-v2's memory initialisation). Other attributes are the loader's."""

    def __init__(
        self,
        loader: Any,
        plan_: Plan,
        collator: str,
        device: torch.device,
        iteration: Callable[[], int],
        seed_value: int,
        rank: int,
        mixup_params: dict[str, Any] | None = None,
    ) -> None:
        self.loader, self.augment, self.collator, self.num_crops = loader, plan_.augment(), collator, plan_.num_crops
        self.device, self.iteration, self.seed_value, self.rank = device, iteration, seed_value, rank
        self.mixup = None
        if collator == MIXUP:  # VISSL's own Mixup/CutMix (timm's), on the device's batch
            from vissl.data.collators.cutmixup_collator import Mixup

            self.mixup = Mixup(**dict(mixup_params or {}))

    def __iter__(self) -> DeviceAugmentedBatches:
        return DeviceAugmentedBatches(self, iter(self.loader))

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


class DeviceAugmentedBatches:
    """An iterator over a DeviceAugmentedLoader's batches.

    A batch's parameters are drawn from a generator seeded by (SEED_VALUE,
    rank, training iteration, batches already drawn at that iteration): a
    training step draws one batch, so a resumed run draws what it would have;
    a pass over the loader at one iteration (DeepCluster-v2's memory) still
    gives each batch its own parameters."""

    def __init__(self, owner: DeviceAugmentedLoader, batches: Iterator[dict[str, Any]]) -> None:
        self.owner, self.batches = owner, batches
        self.last_iteration, self.drawn = None, 0

    def __iter__(self) -> DeviceAugmentedBatches:
        return self

    def __len__(self) -> int:  # ClassyVision's task counts batches per phase with len(data_iterator)
        return len(self.owner.loader)

    def _generator(self) -> torch.Generator:
        iteration = self.owner.iteration()
        self.drawn = self.drawn + 1 if iteration == self.last_iteration else 0
        self.last_iteration = iteration
        return torch.Generator().manual_seed(step_seed(self.owner.seed_value, self.owner.rank, iteration, self.drawn))

    def __next__(self) -> dict[str, Any]:
        batch = next(self.batches)
        owner, generator = self.owner, self._generator()
        groups = crop_groups(batch, owner.collator, owner.num_crops)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for g, (_, _, images, _) in enumerate(groups):  # crops of one size are augmented as one batch
            by_shape.setdefault(tuple(images.shape[1:]), []).append(g)
        for members in by_shape.values():
            images = torch.cat([groups[g][2].to(owner.device, non_blocking=True) for g in members])
            augmented = owner.augment(images, torch.cat([groups[g][3] for g in members]), generator)
            for g, part in zip(members, augmented.split([len(groups[g][2]) for g in members]), strict=True):
                key, index = groups[g][:2]
                if owner.collator == "multicrop_collator":
                    batch[key][0][index] = part
                else:
                    batch[key][index] = part
        if owner.mixup is not None:
            mixed = owner.mixup(
                {"input": batch["data"][0], "target": batch["label"][0].to(owner.device, non_blocking=True)}
            )
            batch["data"][0], batch["label"][0] = mixed["input"], mixed["target"]
        return batch


def step_seed(seed_value: int, rank: int, iteration: int, drawn: int = 0) -> int:
    """The augmentation generator's seed of one batch (ints hash the same in every process)."""
    return hash((int(seed_value), int(rank), int(iteration), int(drawn))) & (2**63 - 1)
