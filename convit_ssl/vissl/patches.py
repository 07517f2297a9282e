"""Every change convit_ssl makes to VISSL 0.1.6, ClassyVision 0.7.0 and what
they call, in one table: `PATCHES` (name, target, the upstream line it
answers, why, and the function that applies it).

`apply()` applies them in table order and is idempotent. `convit_ssl.vissl`
calls it when imported, before anything imports VISSL, so every VISSL entry
point (`convit-ssl run`, tools/*, the trunk module, each spawned rank, a
SLURM job on its node) runs patched. Nothing outside VISSL's world is
touched: `import convit_ssl` and `convit_ssl.models` / `checkpoints` /
`analysis` never import this module. A patch does nothing where what it
restores already exists (a setuptools with pkg_resources, an older numpy).
One that targets a module most runs never load (VISSL's low-shot SVM trainer,
which loads scikit-learn) waits for that module's first import (`_after_import`).
The README's list is this table (`markdown_table()`, checked by
tests/test_patches.py). Run `python -m convit_ssl.vissl.patches` to print it.

The replacement methods below are upstream's line for line except where the
table says; they log through the root logger as upstream does (VISSL's log
handlers sit there).
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import importlib.abc
import importlib.metadata
import importlib.util
import logging
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import numpy as np
import torch
from torch import nn

_APPLIED: List[str] = []


# ------------------------------------------------------------------ before VISSL is imported
def _pkg_resources_standin() -> types.ModuleType:
    """A minimal `pkg_resources` with the two calls VISSL makes."""
    module = types.ModuleType("pkg_resources")
    module.__doc__ = "convit_ssl stand-in for the pkg_resources removed from setuptools >= 81"

    class DistributionNotFound(ImportError):
        pass

    def resource_filename(package: str, resource: str) -> str:
        import importlib.resources

        return str(importlib.resources.files(package).joinpath(resource))

    def get_distribution(name: str) -> types.SimpleNamespace:
        try:
            return types.SimpleNamespace(project_name=name, version=importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError as e:
            raise DistributionNotFound(name) from e

    module.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
    module.resource_filename = resource_filename  # type: ignore[attr-defined]
    module.get_distribution = get_distribution  # type: ignore[attr-defined]
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
def _atomic_save_checkpoint(checkpoint_folder, state, checkpoint_file="checkpoint.torch"):
    """ClassyVision's save_checkpoint, written to a temporary file and renamed into place."""
    from iopath.common.file_io import g_pathmgr

    from convit_ssl.checkpoints.io import atomic_torch_save

    g_pathmgr.mkdirs(checkpoint_folder)
    full_filename = f"{checkpoint_folder}/{checkpoint_file}"
    if "://" in str(checkpoint_folder):  # remote storage has no rename: upstream behaviour
        with g_pathmgr.open(full_filename, "wb") as f:
            torch.save(state, f)
    else:
        atomic_torch_save(state, full_filename)
    return full_filename


def patch_atomic_checkpoints() -> bool:
    import classy_vision.generic.util as classy_util
    import vissl.utils.checkpoint as vissl_checkpoint

    if vissl_checkpoint.save_checkpoint is _atomic_save_checkpoint:
        return False
    classy_util.save_checkpoint = vissl_checkpoint.save_checkpoint = _atomic_save_checkpoint
    return True


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, with 0 bits giving the black image older Pillow gave."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def patch_posterize() -> bool:
    import vissl.data.ssl_transforms.rand_auto_aug as rand_auto_aug

    if rand_auto_aug.posterize is _posterize:
        return False
    rand_auto_aug.posterize = _posterize
    for name, op in list(rand_auto_aug.NAME_TO_OP.items()):
        if getattr(op, "__name__", "") == "posterize":
            rand_auto_aug.NAME_TO_OP[name] = _posterize
    return True


def _build_dino_teacher(self, task: Any) -> None:
    """Upstream `DINOHook._build_momentum_network`, with the teacher's stochastic
    depth off for a convit_ssl trunk too, and SyncBatchNorm only on GPUs."""
    from vissl.models import build_model
    from vissl.models.model_helpers import get_no_ddp_model

    from convit_ssl.vissl.trunk import CONFIG_BLOCK, TRUNK_NAME

    logging.info("Building momentum encoder")  # noqa: LOG015
    trunk = task.config["MODEL"]["TRUNK"]
    trunk["VISION_TRANSFORMERS"]["DROP_PATH_RATE"] = 0
    if trunk["NAME"] == TRUNK_NAME and trunk.get(CONFIG_BLOCK) is not None:
        trunk[CONFIG_BLOCK]["DROP_PATH_RATE"] = 0.0
    task.loss.momentum_teacher = build_model(task.config["MODEL"], task.config["OPTIMIZER"])
    task.loss.momentum_teacher.to(task.device)
    for p in task.loss.momentum_teacher.parameters():
        p.requires_grad = False
    if task.loss.checkpoint is not None:
        task.loss.load_state_dict(task.loss.checkpoint)
    else:
        get_no_ddp_model(task.loss.momentum_teacher).load_state_dict(get_no_ddp_model(task.model).state_dict())
    if task.device.type == "cuda":
        task.loss.momentum_teacher = nn.SyncBatchNorm.convert_sync_batchnorm(task.loss.momentum_teacher)


def patch_dino_teacher() -> bool:
    from vissl.hooks.dino_hooks import DINOHook

    if DINOHook._build_momentum_network is _build_dino_teacher:
        return False
    DINOHook._build_momentum_network = _build_dino_teacher
    return True


def _init_memory(self, dataloader, model) -> None:
    """Upstream `DeepClusterV2Loss.init_memory` on the loss's device."""
    from classy_vision.generic.distributed_util import get_rank

    device = self.local_memory_embeddings.device
    logging.info(f"Rank: {get_rank()}, Start initializing memory banks")  # noqa: LOG015
    start_idx = 0
    with torch.no_grad():
        for inputs in dataloader:
            nmb_unique_idx = len(inputs["data_idx"][0]) // self.num_crops
            index = inputs["data_idx"][0][:nmb_unique_idx].to(device, non_blocking=True)

            # get embeddings
            outputs = []
            for crop_idx in self.crops_for_mb:
                inp = inputs["data"][0][crop_idx].to(device, non_blocking=True)
                outputs.append(nn.functional.normalize(model(inp)[0], dim=1, p=2))

            # fill the memory bank
            self.local_memory_index[start_idx : start_idx + nmb_unique_idx] = index
            for mb_idx, embeddings in enumerate(outputs):
                self.local_memory_embeddings[mb_idx][start_idx : start_idx + nmb_unique_idx] = embeddings
            start_idx += nmb_unique_idx
    logging.info(f"Rank: {get_rank()}, Memory banks initialized: full first forward pass done")  # noqa: LOG015


def _cluster_memory(self) -> None:
    """Upstream `DeepClusterV2Loss.cluster_memory` (distributed k-means) on the loss's device."""
    import torch.distributed as dist
    from classy_vision.generic.distributed_util import (
        all_reduce_sum,
        gather_from_all,
        get_rank,
    )
    from vissl.utils.misc import get_indices_sparse

    device = self.local_memory_embeddings.device
    self.start_idx = 0
    j = 0
    with torch.no_grad():
        for i_K, K in enumerate(self.num_clusters):
            # init centroids with elements from memory bank of rank 0
            centroids = torch.empty(K, self.embedding_dim, device=device)
            if get_rank() == 0:
                random_idx = torch.randperm(len(self.local_memory_embeddings[j]))[:K]
                assert len(random_idx) >= K, "please reduce the number of centroids"
                centroids = self.local_memory_embeddings[j][random_idx]
            dist.broadcast(centroids, 0)

            for n_iter in range(self.nmb_kmeans_iters + 1):
                # E step
                dot_products = torch.mm(self.local_memory_embeddings[j], centroids.t())
                _, assignments = dot_products.max(dim=1)

                # finish
                if n_iter == self.nmb_kmeans_iters:
                    break

                # M step
                where_helper = get_indices_sparse(assignments.cpu().numpy())
                counts = torch.zeros(K, device=device).int()
                emb_sums = torch.zeros(K, self.embedding_dim, device=device)
                for k in range(len(where_helper)):
                    if len(where_helper[k][0]) > 0:
                        emb_sums[k] = torch.sum(self.local_memory_embeddings[j][where_helper[k][0]], dim=0)
                        counts[k] = len(where_helper[k][0])
                all_reduce_sum(counts)
                mask = counts > 0
                all_reduce_sum(emb_sums)
                centroids[mask] = emb_sums[mask] / counts[mask].unsqueeze(1)

                # normalize centroids
                centroids = nn.functional.normalize(centroids, dim=1, p=2)

            getattr(self, "centroids" + str(i_K)).copy_(centroids)
            # gather the assignments
            assignments_all = gather_from_all(assignments)
            indexes_all = gather_from_all(self.local_memory_index)
            self.assignments[i_K] = -100
            self.assignments[i_K][indexes_all] = assignments_all

            j = (j + 1) % self.nmb_mbs

    logging.info(f"Rank: {get_rank()}, clustering of the memory bank done")  # noqa: LOG015


def patch_deepclusterv2_device() -> bool:
    from vissl.losses.deepclusterv2_loss import DeepClusterV2Loss

    if DeepClusterV2Loss.init_memory is _init_memory:
        return False
    DeepClusterV2Loss.init_memory = _init_memory
    DeepClusterV2Loss.cluster_memory = _cluster_memory
    return True


def _update_memory_bank(self, emb: torch.Tensor, idx: torch.Tensor) -> None:
    """Upstream `DeepClusterV2Loss.update_memory_bank` on the detached embeddings."""
    _upstream_update_memory_bank(self, emb.detach(), idx)


_upstream_update_memory_bank: Callable[..., None] = None  # type: ignore[assignment]  (set when patched)


def patch_deepclusterv2_memory_detached() -> bool:
    global _upstream_update_memory_bank
    from vissl.losses.deepclusterv2_loss import DeepClusterV2Loss

    if DeepClusterV2Loss.update_memory_bank is _update_memory_bank:
        return False
    _upstream_update_memory_bank = DeepClusterV2Loss.update_memory_bank
    DeepClusterV2Loss.update_memory_bank = _update_memory_bank
    return True


def patch_moco_queue() -> bool:
    """Upstream `MoCoLoss.forward`, after every rank takes rank 0's initial queue."""
    from vissl.losses.moco_loss import MoCoLoss

    if getattr(MoCoLoss.forward, "convit_ssl_patch", False):
        return False
    upstream = MoCoLoss.forward

    @functools.wraps(upstream)
    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.initialized:
            self.queue = self.queue.to(query.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(self.queue, src=0)
        return upstream(self, query, *args, **kwargs)

    forward.convit_ssl_patch = True
    MoCoLoss.forward = forward
    return True


def _disk_image(self, idx: int) -> Tuple[Any, bool]:
    """Upstream `DiskImageDataset.__getitem__`, reading each image once and as
    8-bit RGB (`convit_ssl.images.open_image`). Upstream indexes the
    ImageFolder, which decodes the image, before its try, again inside it and
    again in its warning: every folder image was decoded twice, and an
    unreadable one raised instead of becoming the grey image the code intends."""
    from iopath.common.file_io import g_pathmgr
    from vissl.data.data_helper import get_mean_image

    from convit_ssl.images import open_image

    if not self.is_initialized:
        self._load_data(self._path)
        self.is_initialized = True
    if not self.queue_init and self.enable_queue_dataset:
        self._init_queues()
    is_success = True
    if self.data_source == "disk_folder":
        image_path = self.image_dataset.samples[idx][0]
    else:
        image_path = self._replace_img_path_prefix(
            self.image_dataset[idx], replace_prefix=self._remove_prefix, new_prefix=self._new_prefix
        )
    try:
        if self.data_source == "disk_filelist":
            with g_pathmgr.open(image_path, "rb") as fopen:
                img = open_image(fopen)
        elif self.data_source == "disk_folder":
            img = open_image(image_path)
        if is_success and self.enable_queue_dataset:
            self.on_sucess(img)
    except Exception as e:
        logging.warning(f"Couldn't load: {image_path}. Exception: \n{e}")  # noqa: LOG015
        is_success = False
        # if we have queue dataset class enabled, we try to use it to get
        # the seen valid images
        if self.enable_queue_dataset:
            img, is_success = self.on_failure()
            if img is None:
                img = get_mean_image(self.cfg["DATA"][self.split].DEFAULT_GRAY_IMG_SIZE)
        else:
            img = get_mean_image(self.cfg["DATA"][self.split].DEFAULT_GRAY_IMG_SIZE)
    return img, is_success


def patch_disk_images() -> bool:
    from vissl.data.disk_dataset import DiskImageDataset

    if DiskImageDataset.__getitem__ is _disk_image:
        return False
    DiskImageDataset.__getitem__ = _disk_image
    return True


def patch_warmup_start() -> bool:
    """Upstream `resolve_linear_schedule`, skipped for a schedule whose
    ``auto_lr_scaling.keep_warmup_start`` is true."""
    from vissl.utils import hydra_config

    if getattr(hydra_config.resolve_linear_schedule, "convit_ssl_patch", False):
        return False
    upstream = hydra_config.resolve_linear_schedule

    @functools.wraps(upstream)
    def resolve_linear_schedule(cfg: Any, param_schedulers: Any) -> Any:
        if param_schedulers.get("auto_lr_scaling", {}).get("keep_warmup_start", False):
            return param_schedulers  # every value already scaled by get_scaled_lr_scheduler
        return upstream(cfg, param_schedulers)

    resolve_linear_schedule.convit_ssl_patch = True
    hydra_config.resolve_linear_schedule = resolve_linear_schedule
    return True


def _extract(self, output_folder: str) -> None:
    """Upstream `SelfSupervisionTrainer.extract` on the task's device (GPU or CPU)."""
    from classy_vision.generic.distributed_util import is_primary
    from vissl.models.model_helpers import get_trunk_output_feature_names

    self.task.prepare_extraction(pin_memory=self.cfg.DATA.PIN_MEMORY)
    self._add_dummy_layer()
    self.task.init_distributed_data_parallel_model()
    if is_primary():
        logging.info("Model is:\n {}".format(self.task.model))  # noqa: LOG015
    feat_names = get_trunk_output_feature_names(self.cfg.MODEL)
    if len(feat_names) == 0:
        feat_names = ["heads"]
    for split in self.task.available_splits:
        logging.info(f"============== Split: {split} =======================")  # noqa: LOG015
        logging.info(f"Extracting features for partition: {split.lower()}")  # noqa: LOG015
        self.task.data_iterator = iter(self.task.dataloaders[split.lower()])
        self._extract_split_features(feat_names, self.task, split, output_folder)
        logging.info(f"Done getting features for partition: {split.lower()}")  # noqa: LOG015
    self._cleanup_task()


def _extract_split_features(self, feat_names, task, split_name: str, output_folder: str) -> None:
    """Upstream `SelfSupervisionTrainer._extract_split_features` with each batch on the task's device."""
    task.model.eval()
    logging.info("Model set to eval mode during feature extraction...")  # noqa: LOG015
    dist_rank = torch.distributed.get_rank()
    out_features: dict = {name: {} for name in feat_names}
    out_targets: dict = {name: {} for name in feat_names}
    chunk_index = 0
    feature_buffer_size = 0
    threshold = self.cfg.EXTRACT_FEATURES.CHUNK_THRESHOLD
    for sample in task.data_iterator:
        assert isinstance(sample, dict)
        assert "data_idx" in sample, "Indices not passed"
        inputs = torch.cat(sample["data"]).to(task.device, non_blocking=True)
        targets = torch.cat(sample["label"]).cpu().numpy()
        inds = torch.cat(sample["data_idx"]).cpu().numpy()
        with torch.no_grad():
            features = self._flatten_features_list(task.model(inputs))
        num_images = inds.shape[0]
        feature_buffer_size += num_images
        for num, feat_name in enumerate(feat_names):
            feature = features[num].cpu().numpy()
            for idx in range(num_images):
                out_features[feat_name][inds[idx]] = feature[idx]
                out_targets[feat_name][inds[idx]] = targets[idx].reshape(-1)
        if feature_buffer_size >= threshold >= 0:
            self._save_extracted_features(features=out_features, targets=out_targets, dist_rank=dist_rank,
                                          chunk_index=chunk_index, split=split_name, output_folder=output_folder)
            for layer_name in out_features:
                out_features[layer_name].clear()
            chunk_index += 1
            feature_buffer_size = 0
    self._save_extracted_features(features=out_features, targets=out_targets, dist_rank=dist_rank,
                                  chunk_index=chunk_index, split=split_name, output_folder=output_folder)


def patch_extraction_device() -> bool:
    from vissl.trainer.trainer_main import SelfSupervisionTrainer

    if SelfSupervisionTrainer.extract is _extract:
        return False
    SelfSupervisionTrainer.extract = _extract
    SelfSupervisionTrainer._extract_split_features = _extract_split_features
    return True


def _low_shot_test(self, features, targets, sample_num, low_shot_kvalue) -> None:
    """Upstream `SVMLowShotTrainer.test`, storing each cost's mean AP as a scalar."""
    from vissl.utils.io import load_file, save_file
    from vissl.utils.svm_utils.evaluate import get_precision_recall

    logging.info("Testing SVM")  # noqa: LOG015
    if self.normalize:
        features = self._normalize_features(features)
    sample_ap_matrix = np.zeros((1, len(self.costs_list)))
    suffix = f"sample{sample_num}_k{low_shot_kvalue}"
    for cost_idx, cost in enumerate(self.costs_list):
        local_cost_ap = np.zeros((self.num_classes, 1))
        for cls_num in self.cls_list:
            logging.info(f"Test sample/k_value/cost/cls: {sample_num}/{low_shot_kvalue}/{cost}/{cls_num}")  # noqa: LOG015
            model = load_file(self._get_svm_low_shot_model_filename(cls_num, cost, suffix))
            prediction = model.decision_function(features)
            eval_preds, eval_cls_labels = self._get_cls_feats_labels(cls_num, prediction, targets)
            _, _, _, ap = get_precision_recall(eval_cls_labels, eval_preds)
            local_cost_ap[cls_num][0] = ap
        sample_ap_matrix[0][cost_idx] = float(np.mean(local_cost_ap))
    out_k_sample_file = f"{self.output_dir}/test_ap_sample{sample_num}_k{low_shot_kvalue}.npy"
    save_data = sample_ap_matrix.reshape((1, -1))
    save_file(save_data, out_k_sample_file)
    logging.info(f"Saved sample test k_idx AP: {out_k_sample_file} {save_data.shape}")  # noqa: LOG015


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch` right after `module` is first imported: a finder ahead of
    the others that finds the module as they would and wraps its loader. For
    modules most runs never import (VISSL's SVM trainers load scikit-learn and
    SciPy: 1.3 s of every start otherwise)."""

    def __init__(self, module: str, patch: Callable[[], None]) -> None:
        self.module, self.patch = module, patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)  # once; and the search below must not find this finder
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_patch(module: types.ModuleType) -> None:
                exec_module(module)
                self.patch()

            spec.loader.exec_module = exec_then_patch  # type: ignore[method-assign]  (this spec's own loader)
        return spec


def _after_import(module: str, patch: Callable[[], None]) -> bool:
    """`patch` now if `module` is loaded, else after its import; False if already arranged."""
    if module in sys.modules:
        patch()
        return True
    if any(isinstance(f, _AfterImport) and f.module == module for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _AfterImport(module, patch))
    return True


def _patch_low_shot_test() -> None:
    from vissl.utils.svm_utils.svm_low_shot_trainer import SVMLowShotTrainer

    SVMLowShotTrainer.test = _low_shot_test


def patch_svm_average_precision() -> bool:
    from vissl.utils.svm_utils import evaluate

    original = evaluate.calculate_ap
    if getattr(original, "__convit_ssl_patch__", False):
        return False

    @functools.wraps(original)
    def calculate_ap(rec, prec) -> float:
        return float(np.asarray(original(rec, prec)).reshape(()))

    calculate_ap.__convit_ssl_patch__ = True  # type: ignore[attr-defined]
    evaluate.calculate_ap = calculate_ap
    _after_import("vissl.utils.svm_utils.svm_low_shot_trainer", _patch_low_shot_test)
    return True


@dataclass(frozen=True)
class Patch:
    name: str
    target: str                 # what is replaced or added
    upstream: str               # the upstream line(s) it answers
    why: str
    apply: Callable[[], bool]   # True when this call changed something


PATCHES: Tuple[Patch, ...] = (
    Patch("pkg_resources stand-in", "sys.modules['pkg_resources']",
          "vissl/utils/misc.py:16,233; vissl/utils/collect_env.py:12,125",
          "setuptools >= 81 no longer ships pkg_resources; VISSL calls only resource_filename and get_distribution",
          shim_pkg_resources),
    Patch("numpy aliases", "numpy.float, numpy.int, numpy.bool",
          "vissl/meters/mean_ap_meter.py:70; vissl/utils/svm_utils/evaluate.py:43; "
          "classy_vision/dataset/transforms/autoaugment.py:168; vissl/data/collators/cutmixup_collator.py:372",
          "numpy 1.24 removed the aliases (numpy 2 has np.bool again)", shim_numpy_aliases),
    Patch("collections ABC aliases", "collections.Mapping, MutableMapping, Sequence, ...",
          "vissl/utils/misc.py:373", "Python 3.10 removed the aliases", shim_collections_abcs),
    Patch("atomic save_checkpoint", "classy_vision.generic.util.save_checkpoint (and VISSL's import of it)",
          "classy_vision/generic/util.py:349; vissl/utils/checkpoint.py:17",
          "it writes the final file in place: a run killed while saving leaves a truncated checkpoint that "
          "auto-resume then fails to load; write to a temporary file and rename",
          patch_atomic_checkpoints),
    Patch("RandAugment posterize(0 bits)", "vissl.data.ssl_transforms.rand_auto_aug.posterize",
          "vissl/data/ssl_transforms/rand_auto_aug.py:272-275",
          "increasing-severity RandAugment asks for 0 bits, which Pillow >= 10 refuses; Pillow 9 gave a black image",
          patch_posterize),
    Patch("DINOHook teacher without stochastic depth", "vissl.hooks.dino_hooks.DINOHook._build_momentum_network",
          "vissl/hooks/dino_hooks.py:48,66-68",
          "upstream zeroes only its own ViT's DROP_PATH_RATE (and never puts the teacher in eval mode), so a "
          "convit_ssl teacher kept the student's stochastic depth; and it converts the teacher to SyncBatchNorm, "
          "which refuses CPU tensors: converted on GPUs only",
          patch_dino_teacher),
    Patch("DeepClusterV2Loss on the task's device",
          "vissl.losses.deepclusterv2_loss.DeepClusterV2Loss.init_memory, .cluster_memory",
          "vissl/losses/deepclusterv2_loss.py:118,123,156,179,180",
          "the memory bank and k-means call .cuda(); every tensor goes on the loss's device instead",
          patch_deepclusterv2_device),
    Patch("DeepCluster-v2 memory bank detached", "vissl.losses.deepclusterv2_loss.DeepClusterV2Loss.update_memory_bank",
          "vissl/losses/deepclusterv2_loss.py:108,138-145",
          "the step's embeddings were copied into the memory bank with their autograd graph (the official "
          "main_deepclusterv2.py stores emb.detach()): the bank became a non-leaf tensor that requires grad "
          "and chains every step's graph until the end of training; it stores the detached embeddings",
          patch_deepclusterv2_memory_detached),
    Patch("warm-up start kept on request", "vissl.utils.hydra_config.resolve_linear_schedule",
          "vissl/utils/hydra_config.py:144-184,240-245",
          "with auto_lr_scaling, VISSL replaces a linear warm-up's start by the lr of one node's batch and drops "
          "the warm-up on one node, so the schedule depends on how the GPUs are split into nodes; a schedule with "
          "auto_lr_scaling.keep_warmup_start: True keeps its configured start (the DeiT recipe's 1e-6)",
          patch_warmup_start),
    Patch("MoCo queue shared by every rank", "vissl.losses.moco_loss.MoCoLoss.forward",
          "vissl/losses/moco_loss.py:52-56,88",
          "each rank filled its initial queue with its own random numbers (VISSL seeds each rank differently), "
          "though the code keeps one queue duplicated on all ranks; rank 0's is broadcast at the first step, so "
          "N processes train as 1",
          patch_moco_queue),
    Patch("disk images read once, as 8-bit RGB", "vissl.data.disk_dataset.DiskImageDataset.__getitem__",
          "vissl/data/disk_dataset.py:139,148-149,155",
          "a disk_folder image was decoded twice (once before the try), so an unreadable file raised in the "
          "rank instead of becoming a grey image; and PIL's convert('RGB') clips 16-bit images to 255 (a 16-bit "
          "scan turns almost all white): each image is read once through convit_ssl.images.open_image",
          patch_disk_images),
    Patch("feature extraction on the task's device",
          "vissl.trainer.trainer_main.SelfSupervisionTrainer.extract, ._extract_split_features",
          "vissl/trainer/trainer_main.py:345,433",
          "the extract_features engine (kNN, SVM, low-shot benchmarks) asserts a GPU and moves batches with "
          ".cuda(); each batch goes to the task's device instead",
          patch_extraction_device),
    Patch("SVM average precision as a scalar",
          "vissl.utils.svm_utils.evaluate.calculate_ap; SVMLowShotTrainer.test",
          "vissl/utils/svm_utils/evaluate.py:9-23; svm_trainer.py:256; svm_low_shot_trainer.py:176-180",
          "a 1-element array stored into a matrix cell, which numpy >= 2.4 refuses; the value as a float",
          patch_svm_average_precision),
)


def apply() -> List[str]:
    """Apply every patch in table order (idempotent); return the names this process has applied."""
    for patch in PATCHES:
        if patch.apply() and patch.name not in _APPLIED:
            _APPLIED.append(patch.name)
    return applied()


def applied() -> List[str]:
    """The names of the patches that changed something in this process, in table order."""
    return [patch.name for patch in PATCHES if patch.name in _APPLIED]


def markdown_table() -> str:
    """The README's list of patches."""
    rows = ["| patch | replaces | answers | why |", "|---|---|---|---|"]
    rows += [f"| {p.name} | `{p.target}` | {p.upstream} | {p.why} |" for p in PATCHES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
