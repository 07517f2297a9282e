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

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from vissl.utils.checkpoint import get_checkpoint_folder

from convit_ssl.analysis import analyze
from convit_ssl.checkpoints import run_folder
from convit_ssl.models.convit import ConViT
from convit_ssl.vissl.hooks.common import BlockKeys, MonitorHook, is_primary, preserved_rng, read_block
from convit_ssl.vissl.hooks.images import held_out_split, load_held_out_images
from convit_ssl.vissl.model.trunk import find_convit

CONFIG_BLOCK = "CONVIT_ANALYSIS"
RECORD_FILE = run_folder.ANALYSIS_RECORDS
# key -> (default, accepted type, condition, what the condition says)
CONFIG_KEYS: BlockKeys = {
    "USE": (False, bool, lambda v: True, "true or false"),
    "FREQUENCY_ITERS": (0, int, lambda v: v >= 0, "an integer >= 0 (0: at the end of each training phase)"),
    "NUM_IMAGES": (8, int, lambda v: v >= 1, "an integer >= 1"),
}


@dataclass(frozen=True)
class AnalysisSettings:
    """A validated, switched-on ``HOOKS.CONVIT_ANALYSIS`` block."""

    frequency_iters: int
    num_images: int


def analysis_settings(config: Any) -> AnalysisSettings | None:
    """The ``HOOKS.CONVIT_ANALYSIS`` block of a VISSL config, validated; None when
    absent or ``USE: false``. Unknown keys, wrong types or values, or USE with
    another trunk than convit_ssl raise a ValueError naming the key."""
    values = read_block(config, CONFIG_BLOCK, CONFIG_KEYS)
    if values is None:
        return None
    return AnalysisSettings(frequency_iters=values["FREQUENCY_ITERS"], num_images=values["NUM_IMAGES"])


# ----------------------------------------------------------------- the numbers
def analysis_record(model: ConViT, images: torch.Tensor) -> dict[str, Any]:
    """Gates and nonlocality of `model` on `images` (B, C, H_img, W_img) as plain
    JSON data: ``{"num_images", "grid", "layers"}``, the layer entries of
    `convit_ssl.analysis.analyze(..., detail=False)`. One forward in eval mode
    under no_grad; the model's train/eval flags are restored."""
    report = analyze(model, images, detail=False)
    return {key: report[key] for key in ("num_images", "grid", "layers")}


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value for one record: per head and per-layer mean of
    the gate and of each nonlocality term (None values are left out)."""
    out: dict[str, float] = {}

    def add(prefix: str, values: list[float | None], index: int) -> None:
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


# ------------------------------------------------------------------- the hook
class ConViTAnalysisHook(MonitorHook):
    """Logs gates and nonlocality of the ConViT trunk on a fixed held-out batch
    (module docstring). Rank 0 works; the other ranks do nothing."""

    def __init__(self, settings: AnalysisSettings, output_path: str, tb_writer: Any = None) -> None:
        super().__init__(output_path, "ConViT analysis", tb_writer, settings.frequency_iters, frequency_epochs=1)
        self.settings = settings
        self.images: torch.Tensor | None = None

    def on_start(self, task: Any) -> None:
        if not is_primary():
            return
        model = find_convit(task.base_model, f"HOOKS.{CONFIG_BLOCK}")
        device = model.patch_embed.proj.weight.device
        with preserved_rng(device):
            images = load_held_out_images(
                task.config, self.settings.num_images, model.img_size, f"HOOKS.{CONFIG_BLOCK}"
            )
        self.images = images.to(device)
        self.records.drop_after(task.iteration)
        logging.info(
            "ConViT analysis: %d held-out images from DATA.%s, every %s, records in %s",
            images.shape[0],
            held_out_split(task.config),
            f"{self.settings.frequency_iters} iterations" if self.settings.frequency_iters else "training phase",
            self.output_path,
        )

    # ------------------------------------------------------------------
    def _log(self, task: Any) -> None:
        if not is_primary():
            return
        assert self.images is not None, "on_start loads the held-out images"
        model = find_convit(task.base_model, f"HOOKS.{CONFIG_BLOCK}")
        with preserved_rng(self.images.device):
            numbers = analysis_record(model, self.images)
        record = {"iteration": int(task.iteration), "epoch": int(task.train_phase_idx), **numbers}
        self.write(record, scalars(record))


def build_hook(config: Any, tb_writer: Any = None) -> ConViTAnalysisHook | None:
    """The hook for `config`, or None when ``HOOKS.CONVIT_ANALYSIS`` is off."""
    settings = analysis_settings(config)
    if settings is None:
        return None
    return ConViTAnalysisHook(settings, os.path.join(get_checkpoint_folder(config), RECORD_FILE), tb_writer)
