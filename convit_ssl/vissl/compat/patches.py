"""Every change convit_ssl makes to VISSL 0.1.6, ClassyVision 0.7.0 and what
they call, in one table: `PATCHES` (name, target, the upstream line it
answers, why, and the function that applies it).

`apply()` applies them in table order and is idempotent. `convit_ssl.vissl`
calls it when imported, before anything imports VISSL, so every VISSL entry
point (`convit-ssl run`, tools/*, the trunk module, each spawned rank and
data-loader worker, a SLURM job on its node) runs patched. Nothing outside VISSL's world is
touched: `import convit_ssl` and `convit_ssl.models` / `checkpoints` /
`analysis` never import this module. A patch does nothing where what it
restores already exists (a setuptools with pkg_resources, an older numpy).
The one part for a module most runs never load (VISSL's low-shot SVM trainer,
which loads scikit-learn) is applied where that module is used
(`low_shot_trainer()`, called by the low-shot benchmark).
docs/STACK.md lists this table (`markdown_table()`, checked by
tests/vissl_adapter/test_patches.py). Run `python -m convit_ssl.vissl.compat.patches` to print it.

Every replacement goes through `_replace`, which marks it (one idempotence
mark); methods replaced whole are copies in `convit_ssl.vissl.compat.upstream`, each
naming the upstream lines and what differs.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import importlib.metadata
import importlib.resources
import importlib.util
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import ImageOps

import convit_ssl.vissl.compat.upstream as upstream
from convit_ssl.checkpoints.io import atomic_torch_save
from convit_ssl.vissl.compat import rng
from convit_ssl.vissl.run import ranks

_APPLIED: list[str] = []


# ------------------------------------------------------------------ before VISSL is imported
def _resource_path(package: str, resource: str) -> str:
    """Where `resource` of `package` lies, as setuptools' `pkg_resources` says: next
    to the package's `__init__`, or to the file of a plain module (VISSL's tests
    name their own module)."""
    module = sys.modules.get(package) or importlib.import_module(package)
    if getattr(module, "__path__", None) is None:  # a plain module: its folder
        return os.path.join(os.path.dirname(module.__file__), resource)
    return str(importlib.resources.files(package).joinpath(resource))


def _pkg_resources_standin() -> types.ModuleType:
    """A minimal `pkg_resources`: the calls VISSL makes (`resource_filename`,
    `get_distribution`), those its test suite makes (`resource_isdir`,
    `resource_listdir`, `resource_exists`) and pytest's `fixup_namespace_packages`."""
    module = types.ModuleType("pkg_resources")
    module.__doc__ = "convit_ssl stand-in for the pkg_resources removed from setuptools >= 81"

    class DistributionNotFound(ImportError):
        pass

    def get_distribution(name: str) -> types.SimpleNamespace:
        try:
            return types.SimpleNamespace(project_name=name, version=importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError as e:
            raise DistributionNotFound(name) from e

    module.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
    module.get_distribution = get_distribution  # type: ignore[attr-defined]
    module.resource_filename = _resource_path  # type: ignore[attr-defined]
    module.resource_exists = lambda package, resource: os.path.exists(_resource_path(package, resource))  # type: ignore[attr-defined]
    module.resource_isdir = lambda package, resource: os.path.isdir(_resource_path(package, resource))  # type: ignore[attr-defined]
    module.resource_listdir = lambda package, resource: sorted(os.listdir(_resource_path(package, resource)))  # type: ignore[attr-defined]
    # pytest's monkeypatch.syspath_prepend calls it whenever a pkg_resources is loaded; no
    # pkg_resources-style namespace package exists without setuptools' own, so nothing to fix up
    module.fixup_namespace_packages = lambda path_item, parent=None: None  # type: ignore[attr-defined]
    return module


def shim_pkg_resources() -> bool:
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return False
    sys.modules["pkg_resources"] = _pkg_resources_standin()
    return True


def shim_numpy_aliases() -> bool:
    missing = [name for name in ("float", "int", "bool") if name not in np.__dict__]
    for name in missing:
        setattr(np, name, {"float": float, "int": int, "bool": bool}[name])
    return bool(missing)


def shim_collections_abcs() -> bool:
    names = ("Mapping", "MutableMapping", "Sequence", "MutableSequence", "Iterable", "Callable")
    missing = [name for name in names if not hasattr(collections, name)]
    for name in missing:
        setattr(collections, name, getattr(collections.abc, name))
    return bool(missing)


# ------------------------------------------------------------------ ClassyVision / VISSL
_MARK = "__convit_ssl_patch__"  # on every replacement: the one sign that a patch is in place


def _replace(owner: Any, name: str, new: Callable[..., Any]) -> bool:
    """`owner.name = new`, `new` marked as convit_ssl's; False (nothing done) where a
    convit_ssl replacement is in place already."""
    if getattr(getattr(owner, name, None), _MARK, False):
        return False
    setattr(new, _MARK, True)
    setattr(owner, name, new)
    return True


def _atomic_save_checkpoint(checkpoint_folder, state, checkpoint_file="checkpoint.torch"):
    """ClassyVision's save_checkpoint, written to a temporary file and renamed into place."""
    # patch order: VISSL is imported by apply(), after the shims above
    from iopath.common.file_io import g_pathmgr

    g_pathmgr.mkdirs(checkpoint_folder)
    full_filename = f"{checkpoint_folder}/{checkpoint_file}"
    if "://" in str(checkpoint_folder):  # remote storage has no rename: upstream behaviour
        with g_pathmgr.open(full_filename, "wb") as f:
            torch.save(state, f)
    else:
        atomic_torch_save(state, full_filename)
    return full_filename


def patch_atomic_checkpoints() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    import classy_vision.generic.util as classy_util
    import vissl.utils.checkpoint as vissl_checkpoint

    changed = [
        _replace(module, "save_checkpoint", _atomic_save_checkpoint) for module in (classy_util, vissl_checkpoint)
    ]
    return any(changed)


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, with 0 bits giving the black image older Pillow gave."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def patch_posterize() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    import vissl.data.ssl_transforms.rand_auto_aug as rand_auto_aug

    if not _replace(rand_auto_aug, "posterize", _posterize):
        return False
    for name, op in list(rand_auto_aug.NAME_TO_OP.items()):  # the table RandAugment looks ops up in
        if getattr(op, "__name__", "") == "posterize":
            rand_auto_aug.NAME_TO_OP[name] = _posterize
    return True


def patch_dino_teacher() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.hooks.dino_hooks import DINOHook

    return _replace(DINOHook, "_build_momentum_network", upstream.build_dino_teacher)


def patch_deepclusterv2_device() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.losses.deepclusterv2_loss import DeepClusterV2Loss

    changed = [
        _replace(DeepClusterV2Loss, "init_memory", upstream.init_memory),
        _replace(DeepClusterV2Loss, "cluster_memory", upstream.cluster_memory),
    ]
    return any(changed)


def patch_deepclusterv2_memory_detached() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.losses.deepclusterv2_loss import DeepClusterV2Loss

    original = DeepClusterV2Loss.update_memory_bank

    def update_memory_bank(self, emb: torch.Tensor, idx: torch.Tensor) -> None:
        """Upstream `DeepClusterV2Loss.update_memory_bank` on the detached embeddings."""
        original(self, emb.detach(), idx)

    return _replace(DeepClusterV2Loss, "update_memory_bank", update_memory_bank)


def patch_moco_queue() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.losses.moco_loss import MoCoLoss

    original = MoCoLoss.forward

    @functools.wraps(original)
    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Upstream `MoCoLoss.forward`, after every rank takes rank 0's initial queue."""
        if not self.initialized:
            self.queue = self.queue.to(query.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(self.queue, src=0)
        return original(self, query, *args, **kwargs)

    return _replace(MoCoLoss, "forward", forward)


def patch_disk_images() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.data.disk_dataset import DiskImageDataset

    return _replace(DiskImageDataset, "__getitem__", upstream.disk_image)


def patch_warmup_start() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.utils import hydra_config

    original = hydra_config.resolve_linear_schedule

    @functools.wraps(original)
    def resolve_linear_schedule(cfg: Any, param_schedulers: Any) -> Any:
        """Upstream `resolve_linear_schedule`, skipped for a schedule whose
        ``auto_lr_scaling.keep_warmup_start`` is true."""
        if param_schedulers.get("auto_lr_scaling", {}).get("keep_warmup_start", False):
            return param_schedulers  # every value already scaled by get_scaled_lr_scheduler
        return original(cfg, param_schedulers)

    return _replace(hydra_config, "resolve_linear_schedule", resolve_linear_schedule)


def patch_extraction_device() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.trainer.trainer_main import SelfSupervisionTrainer

    changed = [
        _replace(SelfSupervisionTrainer, "extract", upstream.extract),
        _replace(SelfSupervisionTrainer, "_extract_split_features", upstream.extract_split_features),
    ]
    return any(changed)


def patch_phase_garbage_collection() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.trainer.train_task import SelfSupervisionTask

    return _replace(SelfSupervisionTask, "recreate_data_iterator", upstream.recreate_data_iterator)


def patch_resume_from_preemption() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.utils import distributed_launcher

    original = distributed_launcher.get_resume_checkpoint

    @functools.wraps(original)
    def get_resume_checkpoint(cfg: Any, checkpoint_folder: str) -> Any:
        # patch order: run.stop imports ClassyVision, so it loads after the patches
        from convit_ssl.vissl.run.stop import resume_checkpoint

        return resume_checkpoint(cfg, checkpoint_folder, original(cfg, checkpoint_folder))

    return _replace(distributed_launcher, "get_resume_checkpoint", get_resume_checkpoint)


def patch_spawned_processes() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.data.ssl_dataset import GenericSSLDataset
    from vissl.utils import distributed_launcher

    if not getattr(distributed_launcher._distributed_worker, _MARK, False):
        ranks.rank_worker.upstream = distributed_launcher._distributed_worker  # type: ignore[attr-defined]
    changed = [
        _replace(distributed_launcher, "_distributed_worker", ranks.rank_worker),
        _replace(GenericSSLDataset, "__reduce_ex__", ranks.dataset_reduce),
    ]
    return any(changed)


def patch_rng_states() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.hooks.log_hooks import LogLossMetricsCheckpointHook
    from vissl.trainer.train_task import SelfSupervisionTask
    from vissl.trainer.trainer_main import SelfSupervisionTrainer
    from vissl.utils.checkpoint import is_checkpoint_phase

    hook = LogLossMetricsCheckpointHook
    on_phase_end, on_step = hook.on_phase_end, hook.on_step
    get_classy_state, set_classy_state = SelfSupervisionTask.get_classy_state, SelfSupervisionTask._set_classy_state
    advance_phase = SelfSupervisionTrainer._advance_phase

    @functools.wraps(on_phase_end)
    def on_phase_end_carrying(self: Any, task: Any) -> None:
        """Upstream `on_phase_end`; a phase checkpoint carries the ranks' generators."""
        frequency = task.config["CHECKPOINT"]["CHECKPOINT_FREQUENCY"]
        saving = task.train and is_checkpoint_phase(
            task.train_phase_idx, frequency, task.train_phase_idx, task.num_train_phases, "phase"
        )
        with rng.carried(task, saving):
            on_phase_end(self, task)

    @functools.wraps(on_step)
    def on_step_carrying(self: Any, task: Any) -> None:
        """Upstream `on_step`; an iteration checkpoint carries the ranks' generators."""
        frequency = task.config["CHECKPOINT"]["CHECKPOINT_ITER_FREQUENCY"]
        with rng.carried(task, frequency > 0 and task.iteration % frequency == 0):
            on_step(self, task)

    @functools.wraps(get_classy_state)
    def get_classy_state_carrying(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return rng.add_to_state(self, get_classy_state(self, *args, **kwargs))

    @functools.wraps(set_classy_state)
    def set_classy_state_keeping(self: Any, state: dict[str, Any]) -> None:
        set_classy_state(self, state)
        rng.keep_for_resume(self, state)

    @functools.wraps(advance_phase)
    def advance_phase_restoring(self: Any, task: Any) -> None:
        """Upstream `_advance_phase`; the first after a resume sets the checkpoint's
        generators before it (a phase checkpoint) or after it (an iteration one)."""
        rng.restore(task, mid_phase=False)
        advance_phase(self, task)
        rng.restore(task, mid_phase=True)

    changed = [
        _replace(hook, "on_phase_end", on_phase_end_carrying),
        _replace(hook, "on_step", on_step_carrying),
        _replace(SelfSupervisionTask, "get_classy_state", get_classy_state_carrying),
        _replace(SelfSupervisionTask, "_set_classy_state", set_classy_state_keeping),
        _replace(SelfSupervisionTrainer, "_advance_phase", advance_phase_restoring),
    ]
    return any(changed)


def low_shot_trainer() -> type:
    """VISSL's `SVMLowShotTrainer`, patched (the last part of the patch "SVM
    average precision as a scalar"). Its module loads scikit-learn and SciPy
    (1.3 s), so it is imported and patched only where the low-shot benchmark
    needs it (`benchmarks.low_shot`), not in every process."""
    # start-up: loads scikit-learn and SciPy (1.3 s), only for the low-shot benchmark
    from vissl.utils.svm_utils.svm_low_shot_trainer import SVMLowShotTrainer

    _replace(SVMLowShotTrainer, "test", upstream.low_shot_test)
    return SVMLowShotTrainer


def patch_svm_average_precision() -> bool:
    # patch order: VISSL is imported by apply(), after the shims above
    from vissl.utils.svm_utils import evaluate

    original = evaluate.calculate_ap

    @functools.wraps(original)
    def calculate_ap(rec, prec) -> float:
        return float(np.asarray(original(rec, prec)).reshape(()))

    return _replace(evaluate, "calculate_ap", calculate_ap)  # SVMLowShotTrainer.test: low_shot_trainer()


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # what is replaced or added
    upstream: str  # the upstream line(s) it answers
    why: str
    apply: Callable[[], bool]  # True when this call changed something


PATCHES: tuple[Patch, ...] = (
    Patch(
        "pkg_resources stand-in",
        "sys.modules['pkg_resources']",
        "vissl/utils/misc.py:16,233; vissl/utils/collect_env.py:12,125",
        "setuptools >= 81 no longer ships pkg_resources; VISSL calls only resource_filename and get_distribution, "
        "its test suite also resource_isdir, resource_listdir and resource_filename of a plain module, pytest's "
        "monkeypatch.syspath_prepend fixup_namespace_packages",
        shim_pkg_resources,
    ),
    Patch(
        "numpy aliases",
        "numpy.float, numpy.int, numpy.bool",
        "vissl/meters/mean_ap_meter.py:70; vissl/utils/svm_utils/evaluate.py:43; "
        "classy_vision/dataset/transforms/autoaugment.py:168; vissl/data/collators/cutmixup_collator.py:372",
        "numpy 1.24 removed the aliases (numpy 2 has np.bool again)",
        shim_numpy_aliases,
    ),
    Patch(
        "collections ABC aliases",
        "collections.Mapping, MutableMapping, Sequence, ...",
        "vissl/utils/misc.py:373",
        "Python 3.10 removed the aliases",
        shim_collections_abcs,
    ),
    Patch(
        "atomic save_checkpoint",
        "classy_vision.generic.util.save_checkpoint (and VISSL's import of it)",
        "classy_vision/generic/util.py:349; vissl/utils/checkpoint.py:17",
        "it writes the final file in place: a run killed while saving leaves a truncated checkpoint that "
        "auto-resume then fails to load; write to a temporary file and rename",
        patch_atomic_checkpoints,
    ),
    Patch(
        "RandAugment posterize(0 bits)",
        "vissl.data.ssl_transforms.rand_auto_aug.posterize",
        "vissl/data/ssl_transforms/rand_auto_aug.py:272-275",
        "increasing-severity RandAugment asks for 0 bits, which Pillow >= 10 refuses; Pillow 9 gave a black image",
        patch_posterize,
    ),
    Patch(
        "DINOHook teacher without stochastic depth",
        "vissl.hooks.dino_hooks.DINOHook._build_momentum_network",
        "vissl/hooks/dino_hooks.py:48,66-68",
        "upstream zeroes only its own ViT's DROP_PATH_RATE (and never puts the teacher in eval mode), so a "
        "convit_ssl teacher kept the student's stochastic depth; and it converts the teacher to SyncBatchNorm, "
        "which refuses CPU tensors: converted on GPUs only",
        patch_dino_teacher,
    ),
    Patch(
        "DeepClusterV2Loss on the task's device",
        "vissl.losses.deepclusterv2_loss.DeepClusterV2Loss.init_memory, .cluster_memory",
        "vissl/losses/deepclusterv2_loss.py:118,123,156,179,180",
        "the memory bank and k-means call .cuda(); every tensor goes on the loss's device instead",
        patch_deepclusterv2_device,
    ),
    Patch(
        "DeepCluster-v2 memory bank detached",
        "vissl.losses.deepclusterv2_loss.DeepClusterV2Loss.update_memory_bank",
        "vissl/losses/deepclusterv2_loss.py:108,138-145",
        "the step's embeddings were copied into the memory bank with their autograd graph (the official "
        "main_deepclusterv2.py stores emb.detach()): the bank became a non-leaf tensor that requires grad "
        "and chains every step's graph until the end of training; it stores the detached embeddings",
        patch_deepclusterv2_memory_detached,
    ),
    Patch(
        "warm-up start kept on request",
        "vissl.utils.hydra_config.resolve_linear_schedule",
        "vissl/utils/hydra_config.py:144-184,240-245",
        "with auto_lr_scaling, VISSL replaces a linear warm-up's start by the lr of one node's batch and drops "
        "the warm-up on one node, so the schedule depends on how the GPUs are split into nodes; a schedule with "
        "auto_lr_scaling.keep_warmup_start: True keeps its configured start (the DeiT recipe's 1e-6)",
        patch_warmup_start,
    ),
    Patch(
        "MoCo queue shared by every rank",
        "vissl.losses.moco_loss.MoCoLoss.forward",
        "vissl/losses/moco_loss.py:52-56,88",
        "each rank filled its initial queue with its own random numbers (VISSL seeds each rank differently), "
        "though the code keeps one queue duplicated on all ranks; rank 0's is broadcast at the first step, so "
        "N processes train as 1",
        patch_moco_queue,
    ),
    Patch(
        "disk images read once, as 8-bit RGB",
        "vissl.data.disk_dataset.DiskImageDataset.__getitem__",
        "vissl/data/disk_dataset.py:139,148-149,155",
        "a disk_folder image was decoded twice (once before the try), so an unreadable file raised in the "
        "rank instead of becoming a grey image; and PIL's convert('RGB') clips 16-bit images to 255 (a 16-bit "
        "scan turns almost all white): each image is read once through convit_ssl.images.open_image",
        patch_disk_images,
    ),
    Patch(
        "feature extraction on the task's device",
        "vissl.trainer.trainer_main.SelfSupervisionTrainer.extract, ._extract_split_features",
        "vissl/trainer/trainer_main.py:345,433",
        "the extract_features engine (kNN, SVM, low-shot benchmarks) asserts a GPU and moves batches with "
        ".cuda(); each batch goes to the task's device instead",
        patch_extraction_device,
    ),
    Patch(
        "no full garbage collection per phase without loader workers",
        "vissl.trainer.train_task.SelfSupervisionTask.recreate_data_iterator",
        "vissl/trainer/train_task.py:558,563",
        "two gc.collect() at every phase change, there to hasten the shutdown of data-loader worker processes, "
        "cost about 0.15 s each in a process holding torch and VISSL; with NUM_DATALOADER_WORKERS 0 there are "
        "none, and a run of many short epochs (a 5 % data-efficiency subset: 345 phases of one iteration) spent "
        "half its time collecting; they run only when the loader has workers",
        patch_phase_garbage_collection,
    ),
    Patch(
        "ranks and data workers set up as their parent",
        "vissl.utils.distributed_launcher._distributed_worker; GenericSSLDataset.__reduce_ex__ (added)",
        "vissl/utils/distributed_launcher.py:135-148; vissl/data/__init__.py:176,190-200",
        "a spawned rank unpickles VISSL's worker, and a data-loader worker (spawn or forkserver) VISSL's "
        "dataset, in a fresh interpreter that imports VISSL unpatched (without the pkg_resources stand-in it "
        "cannot) unless its __main__ set VISSL up; both pickles now start with a function of convit_ssl.vissl, "
        "so each process sets itself up before it loads anything of VISSL's; a spawned rank also gets "
        "SIGTERM when its launcher dies, and a data-loader worker ignores the stop signals (its rank ends it)",
        patch_spawned_processes,
    ),
    Patch(
        "resume from a preemption checkpoint",
        "vissl.utils.distributed_launcher.get_resume_checkpoint",
        "vissl/utils/checkpoint.py:566-572; vissl/utils/distributed_launcher.py:106-114",
        "VISSL resumes from iteration checkpoints only when CHECKPOINT_ITER_FREQUENCY > 0, so the checkpoint a "
        "stopped run wrote (convit_ssl.vissl.run.stop) would be skipped; when checkpoint.torch points at an "
        "iteration checkpoint (the last one written), the run resumes from it",
        patch_resume_from_preemption,
    ),
    Patch(
        "random-number states carried in checkpoints",
        "LogLossMetricsCheckpointHook.on_phase_end, .on_step; SelfSupervisionTask.get_classy_state, "
        "._set_classy_state; SelfSupervisionTrainer._advance_phase",
        "vissl/utils/misc.py:166-178; vissl/engines/train.py:106; vissl/hooks/log_hooks.py:341-370; "
        "vissl/trainer/train_task.py:566; vissl/trainer/trainer_main.py:177-182,280",
        "each rank is seeded at start and no generator state is saved, so a resumed run drew other crops, flips "
        "and stochastic-depth masks than the uninterrupted one from its first step (2.1e-3 apart after 40 epochs); "
        "the ranks gather their Python, NumPy and torch states where a checkpoint is written and each rank sets "
        "its own where the uninterrupted run stood (convit_ssl.vissl.compat.rng)",
        patch_rng_states,
    ),
    Patch(
        "SVM average precision as a scalar",
        "vissl.utils.svm_utils.evaluate.calculate_ap; SVMLowShotTrainer.test",
        "vissl/utils/svm_utils/evaluate.py:9-23; svm_trainer.py:256; svm_low_shot_trainer.py:176-180",
        "a 1-element array stored into a matrix cell, which numpy >= 2.4 refuses; the value as a float",
        patch_svm_average_precision,
    ),
)


def apply() -> list[str]:
    """Apply every patch in table order (idempotent); return the names this process has applied."""
    for patch in PATCHES:
        if patch.apply() and patch.name not in _APPLIED:
            _APPLIED.append(patch.name)
    return applied()


def applied() -> list[str]:
    """The names of the patches that changed something in this process, in table order."""
    return [patch.name for patch in PATCHES if patch.name in _APPLIED]


def markdown_table() -> str:
    """The list of patches in docs/STACK.md."""
    rows = ["| patch | replaces | answers | why |", "|---|---|---|---|"]
    rows += [f"| {p.name} | `{p.target}` | {p.upstream} | {p.why} |" for p in PATCHES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
