"""The hooks of a convit_ssl VISSL run: VISSL's defaults, the count of
unreadable images (`hooks.unreadable`, always), the stop on a signal with a
checkpoint (`run.stop`, always), and convit_ssl's analysis (`hooks.analysis`)
and online kNN (`hooks.knn`) monitors when their config blocks switch them
on."""

from __future__ import annotations

from typing import Any

from classy_vision.hooks.classy_hook import ClassyHook
from vissl.hooks import LogLossMetricsCheckpointHook, SSLTensorboardHook, default_hook_generator

from convit_ssl.vissl.hooks import analysis as analysis_hook
from convit_ssl.vissl.hooks import knn as knn_hook
from convit_ssl.vissl.hooks.common import metrics_file
from convit_ssl.vissl.hooks.unreadable import UnreadableImagesHook
from convit_ssl.vissl.run.stop import StopHook


def validate_hook_configs(config: Any) -> None:
    """Pre-launch check of the ``HOOKS.CONVIT_ANALYSIS`` and ``HOOKS.CONVIT_KNN`` blocks."""
    analysis_hook.analysis_settings(config)
    knn_hook.knn_settings(config)


def hook_generator(cfg: Any) -> list[ClassyHook]:
    """VISSL's `default_hook_generator`, plus `UnreadableImagesHook`, and
    `ConViTAnalysisHook` and `ConViTKnnHook` when switched on, and `StopHook`: placed before
    VISSL's checkpoint hook (so that their records precede each checkpoint),
    writing to the TensorBoard writer of VISSL's tensorboard hook, if any. Runs in every rank (a
    module-level function, so spawn can pickle it)."""
    hooks = default_hook_generator(cfg)
    tb_writer = next((h.tb_writer for h in hooks if isinstance(h, SSLTensorboardHook)), None)
    monitors = (analysis_hook.build_hook(cfg, tb_writer), knn_hook.build_hook(cfg, tb_writer))
    ours = [UnreadableImagesHook(metrics_file(cfg)), *(hook for hook in monitors if hook), StopHook()]
    position = next((i for i, h in enumerate(hooks) if isinstance(h, LogLossMetricsCheckpointHook)), len(hooks))
    return hooks[:position] + ours + hooks[position:]
