"""Live ConViT analysis during VISSL training: gates and nonlocality per layer and head.

Switched on by the config block (absent = off; every key optional)::

    HOOKS.CONVIT_ANALYSIS:
      USE: false            # true: add the hook (needs MODEL.TRUNK.NAME: convit_ssl)
      FREQUENCY_ITERS: 0    # N > 0: after every N training iterations; 0: at the end of each training phase (epoch)
      NUM_IMAGES: 8         # size of the held-out batch

``+config/convit_ssl/hooks=analysis`` adds the block with USE: true.

On rank 0 only, at each trigger, the hook measures the trunk (the
`convit_ssl.models.ConViT` inside ``task.base_model``) on a fixed held-out
batch with `convit_ssl.analysis` (one forward in eval mode under no_grad;
the train/eval flags and every RNG state are restored; no collective op, so
the other ranks simply go on) and appends one JSON object per line to
``<checkpoint folder>/convit_analysis.jsonl``::

    {"iteration": task.iteration, "epoch": training phase index (0-based),
     "num_images": B, "grid": [H, W],
     "layers": [{"index": i, "kind": "gpsa" | "mhsa",
                 "gate": [per head],                       # GPSA only: sigmoid(lambda)
                 "nonlocality": {"combined": [per head],   # every layer
                                 "positional": [...], "content": [...]}},  # GPSA only
                ...]}

These are `analyze()`'s layer entries without the attention maps, centres and
spans. With VISSL's TensorBoard on (HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD)
the same numbers go to its writer (``<checkpoint folder>/tb_logs``) at step
``iteration``: ``convit/gate/layer{i}/head{h}``, ``convit/nonlocality/layer{i}/head{h}``
(combined), ``convit/nonlocality_positional/...``, ``convit/nonlocality_content/...``,
each with a per-layer ``.../layer{i}/mean``.

Held-out batch: the first NUM_IMAGES samples (after VISSL's DATA_LIMIT
subsampling, which is seeded) of the TEST split when the run reads it, else
of the TRAIN split, read by VISSL's own data sources, and transformed without
randomness: Resize (shorter side to the longer side of the trunk's image
size), CenterCrop to the trunk's image size (H, W), ToTensor, and the
split's Normalize (else TRAIN's; none if the config has none). The batch is
built once, at the start of training, and kept on the model's device.

Auto-resume: at the start, records later than the resumed iteration are
dropped (the hook runs before VISSL's checkpoint hook, so a record at or
before a checkpoint's iteration was written before that checkpoint); the run
then appends, so the file holds exactly one record per trigger.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from classy_vision.hooks.classy_hook import ClassyHook
from torch import nn

from convit_ssl.analysis import collect_attention, gates, nonlocality, to_plain
from convit_ssl.analysis.collect import GPSA_KIND
from convit_ssl.models.convit import ConViT

CONFIG_BLOCK = "CONVIT_ANALYSIS"
RECORD_FILE = "convit_analysis.jsonl"
# key -> (default, accepted type, condition, what the condition says)
CONFIG_KEYS: Dict[str, tuple] = {
    "USE": (False, bool, lambda v: True, "true or false"),
    "FREQUENCY_ITERS": (0, int, lambda v: v >= 0, "an integer >= 0 (0: at the end of each training phase)"),
    "NUM_IMAGES": (8, int, lambda v: v >= 1, "an integer >= 1"),
}
GPSA_TERMS = ("combined", "positional", "content")


@dataclass(frozen=True)
class AnalysisSettings:
    """A validated, switched-on ``HOOKS.CONVIT_ANALYSIS`` block."""

    frequency_iters: int
    num_images: int


def analysis_settings(config: Any) -> Optional[AnalysisSettings]:
    """The ``HOOKS.CONVIT_ANALYSIS`` block of a VISSL config, validated; None when
    absent or ``USE: false``. Unknown keys, wrong types or values, or USE with
    another trunk than convit_ssl raise a ValueError naming the key."""
    from convit_ssl.vissl.trunk import TRUNK_NAME

    where = f"config.HOOKS.{CONFIG_BLOCK}"
    block = config.HOOKS.get(CONFIG_BLOCK)
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(CONFIG_KEYS)}, got {block!r}")
    unknown = sorted(set(block) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid: {', '.join(CONFIG_KEYS)}")
    values = {}
    for key, (default, kind, ok, expected) in CONFIG_KEYS.items():
        value = block.get(key, default)
        # bool is an int subclass: refuse USE=1 and FREQUENCY_ITERS=true alike
        if type(value) is not kind or not ok(value):
            raise ValueError(f"{where}.{key} must be {expected}, got {value!r}")
        values[key] = value
    if not values["USE"]:
        return None
    if config.MODEL.TRUNK.NAME != TRUNK_NAME:
        raise ValueError(
            f"{where}.USE=true needs config.MODEL.TRUNK.NAME={TRUNK_NAME}, got {config.MODEL.TRUNK.NAME!r}"
        )
    return AnalysisSettings(frequency_iters=values["FREQUENCY_ITERS"], num_images=values["NUM_IMAGES"])


def validate_analysis_config(config: Any) -> None:
    """Pre-launch check of the ``HOOKS.CONVIT_ANALYSIS`` block (see `analysis_settings`)."""
    analysis_settings(config)


# ----------------------------------------------------------------- the numbers
def find_convit(model: nn.Module) -> ConViT:
    """The ConViT trunk inside a VISSL model (DDP wrapper, if any, removed):
    ``model.trunk`` when it is one, else the first ConViT among the submodules."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    trunk = getattr(model, "trunk", None)
    if isinstance(trunk, ConViT):
        return trunk
    for module in model.modules():
        if isinstance(module, ConViT):
            return module
    raise ValueError(
        f"HOOKS.{CONFIG_BLOCK}: no convit_ssl ConViT in the model ({type(model).__name__}); "
        "the hook needs MODEL.TRUNK.NAME=convit_ssl"
    )


def analysis_record(model: ConViT, images: torch.Tensor) -> Dict[str, Any]:
    """Gates and nonlocality of `model` on `images` (B, C, H_img, W_img) as plain
    JSON data: ``{"num_images", "grid", "layers"}``, the layer entries of
    `convit_ssl.analysis.analyze` without maps, centres and spans.

    One forward in eval mode under no_grad (`collect_attention`); the model's
    train/eval flags are restored."""
    records = collect_attention(model, images)
    nonloc = {term: nonlocality(records, term) for term in GPSA_TERMS}
    gate_rows = gates(model)
    gpsa_blocks = [r.index for r in records if r.kind == GPSA_KIND]
    layers = []
    for row, record in enumerate(records):
        entry: Dict[str, Any] = {"index": record.index, "kind": record.kind}
        if record.kind == GPSA_KIND:
            entry["gate"] = gate_rows[gpsa_blocks.index(record.index)]
            terms = GPSA_TERMS
        else:
            terms = ("combined",)
        entry["nonlocality"] = {term: nonloc[term][row] for term in terms}
        layers.append(entry)
    return to_plain({"num_images": int(images.shape[0]), "grid": list(records[0].grid), "layers": layers})


def scalars(record: Mapping[str, Any]) -> Dict[str, float]:
    """TensorBoard tag -> value for one record: per head and per-layer mean of
    the gate and of each nonlocality term (None values are left out)."""
    out: Dict[str, float] = {}

    def add(prefix: str, values: List[Optional[float]], index: int) -> None:
        finite = [v for v in values if v is not None]
        for h, value in enumerate(values):
            if value is not None:
                out[f"convit/{prefix}/layer{index}/head{h}"] = value
        if finite:
            out[f"convit/{prefix}/layer{index}/mean"] = sum(finite) / len(finite)

    for layer in record["layers"]:
        if "gate" in layer:
            add("gate", layer["gate"], layer["index"])
        for term, values in layer["nonlocality"].items():
            add("nonlocality" if term == "combined" else f"nonlocality_{term}", values, layer["index"])
    return out


# ----------------------------------------------------------- held-out images
def held_out_split(config: Any) -> str:
    """TEST when the run reads its TEST split (and it has data sources), else TRAIN."""
    from convit_ssl.vissl.validate import used_splits

    if "TEST" in used_splits(config) and config.DATA.TEST.DATA_SOURCES:
        return "TEST"
    return "TRAIN"


def eval_transforms(config: Any, split: str, image_size: Tuple[int, int]) -> List[Dict[str, Any]]:
    """VISSL transform list without randomness: Resize, CenterCrop to `image_size`
    (H, W), ToTensor, and the Normalize of `split` (else of TRAIN), if any."""
    height, width = image_size
    transforms: List[Dict[str, Any]] = [
        {"name": "Resize", "size": max(height, width)},
        {"name": "CenterCrop", "size": [height, width]},
        {"name": "ToTensor"},
    ]
    for source in (split, "TRAIN"):
        normalize = [t for t in config.DATA[source].TRANSFORMS if t.get("name") == "Normalize"]
        if normalize:
            transforms.append({"name": "Normalize", "mean": list(normalize[-1]["mean"]),
                               "std": list(normalize[-1]["std"])})
            break
    return transforms


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and `device`'s CUDA) RNG states
    after the block, so that the analysis leaves training's random streams as they were."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def load_held_out_images(config: Any, num_images: int, image_size: Tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) the first `num_images` samples (fewer if the split is smaller)
    of the held-out split, transformed by `eval_transforms`, on the CPU."""
    from vissl.data import build_dataset

    split = held_out_split(config)
    where = f"HOOKS.{CONFIG_BLOCK}: held-out images from config.DATA.{split} {list(config.DATA[split].DATASET_NAMES)}"
    local = copy.deepcopy(config)
    local.DATA[split].TRANSFORMS = eval_transforms(config, split, image_size)
    local.DATA[split].LABEL_SOURCES = []  # images only: labels are not read
    try:
        dataset = build_dataset(local, split)
        count = min(num_images, len(dataset))
        items = [dataset[i] for i in range(count)]
    except Exception as e:
        raise RuntimeError(f"{where}: could not be read ({type(e).__name__}: {e})") from e
    if count == 0:
        raise RuntimeError(f"{where}: the split has no samples")
    bad = [i for i, item in enumerate(items) if item["data_valid"][0] != 1]
    if bad:
        raise RuntimeError(f"{where}: samples {bad} could not be read (VISSL returned placeholder images)")
    return torch.stack([item["data"][0] for item in items])


# ------------------------------------------------------------------- the hook
def _is_primary() -> bool:
    from classy_vision.generic.distributed_util import is_primary

    return is_primary()


class ConViTAnalysisHook(ClassyHook):
    """Logs gates and nonlocality of the ConViT trunk on a fixed held-out batch
    (module docstring). Rank 0 works; the other ranks do nothing."""

    on_phase_start = ClassyHook._noop

    def __init__(self, settings: AnalysisSettings, output_path: str, tb_writer: Any = None) -> None:
        super().__init__()  # nothing goes into self.state: VISSL checkpoints it
        self.settings = settings
        self.output_path = output_path
        self.tb_writer = tb_writer
        self.images: Optional[torch.Tensor] = None

    def on_start(self, task: Any) -> None:
        if not _is_primary():
            return
        model = find_convit(task.base_model)
        device = model.patch_embed.proj.weight.device
        with preserved_rng(device):
            images = load_held_out_images(task.config, self.settings.num_images, model.img_size)
        self.images = images.to(device)
        self._drop_records_after(task.iteration)
        logging.info(
            "ConViT analysis: %d held-out images from DATA.%s, every %s, records in %s",
            images.shape[0], held_out_split(task.config),
            f"{self.settings.frequency_iters} iterations" if self.settings.frequency_iters else "training phase",
            self.output_path,
        )

    def on_step(self, task: Any) -> None:
        every = self.settings.frequency_iters
        if every > 0 and task.train and task.iteration % every == 0:
            self._log(task)

    def on_phase_end(self, task: Any) -> None:
        if self.settings.frequency_iters == 0 and task.train:
            self._log(task)

    def on_end(self, task: Any) -> None:
        if self.tb_writer is not None and _is_primary():
            self.tb_writer.flush()

    # ------------------------------------------------------------------
    def _log(self, task: Any) -> None:
        if not _is_primary():
            return
        assert self.images is not None, "on_start loads the held-out images"
        model = find_convit(task.base_model)
        with preserved_rng(self.images.device):
            numbers = analysis_record(model, self.images)
        record = {"iteration": int(task.iteration), "epoch": int(task.train_phase_idx), **numbers}
        line = json.dumps(record, allow_nan=False)
        with open(self.output_path, "a") as f:
            f.write(line + "\n")
            f.flush()
        if self.tb_writer is not None:
            for tag, value in scalars(record).items():
                self.tb_writer.add_scalar(tag, value, global_step=record["iteration"])
            self.tb_writer.flush()

    def _drop_records_after(self, iteration: int) -> None:
        """Keep only records up to `iteration` (the resumed one; 0 for a fresh run)."""
        if not os.path.exists(self.output_path):
            return
        with open(self.output_path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a kill: it is rewritten after the resume
                logging.warning("ConViT analysis: dropping unreadable line %d of %s", number, self.output_path)
                continue
            if record.get("iteration", iteration + 1) <= iteration:
                kept.append(line)
        if len(kept) == len(lines):
            return
        logging.info("ConViT analysis: resuming at iteration %d, dropping %d later record(s) of %s",
                     iteration, len(lines) - len(kept), self.output_path)
        tmp = f"{self.output_path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(line + "\n" for line in kept)
        os.replace(tmp, self.output_path)


def hook_generator(cfg: Any) -> List[ClassyHook]:
    """VISSL's `default_hook_generator`, plus `ConViTAnalysisHook` when
    ``HOOKS.CONVIT_ANALYSIS.USE`` is on: placed before VISSL's checkpoint hook,
    and writing to the TensorBoard writer of VISSL's tensorboard hook, if any.
    Runs in every rank (a module-level function, so spawn can pickle it)."""
    from vissl.hooks import LogLossMetricsCheckpointHook, SSLTensorboardHook, default_hook_generator
    from vissl.utils.checkpoint import get_checkpoint_folder

    hooks = default_hook_generator(cfg)
    settings = analysis_settings(cfg)
    if settings is None:
        return hooks
    tb_writer = next((h.tb_writer for h in hooks if isinstance(h, SSLTensorboardHook)), None)
    hook = ConViTAnalysisHook(settings, os.path.join(get_checkpoint_folder(cfg), RECORD_FILE), tb_writer)
    position = next((i for i, h in enumerate(hooks) if isinstance(h, LogLossMetricsCheckpointHook)), len(hooks))
    hooks.insert(position, hook)
    return hooks
