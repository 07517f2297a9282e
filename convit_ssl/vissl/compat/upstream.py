"""Upstream methods of VISSL 0.1.6 that convit_ssl replaces whole, each a copy
of the named upstream lines with the differences listed in its docstring
("Differs from upstream: ..."); `convit_ssl.vissl.compat.patches` installs them (its
table says why). Everything else is upstream's line for line: they log through
the root logger as upstream does (VISSL's log handlers sit there).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from convit_ssl.images import open_image
from convit_ssl.vissl.model.trunk import CONFIG_BLOCK, TRUNK_NAME


def build_dino_teacher(self, task: Any) -> None:
    """Upstream `DINOHook._build_momentum_network`, with the teacher's stochastic
    depth off for a convit_ssl trunk too, and SyncBatchNorm only on GPUs.

    Upstream: vissl/hooks/dino_hooks.py:40-69 (DINOHook._build_momentum_network). Differs from upstream: the teacher's stochastic depth is also zeroed for a convit_ssl trunk (upstream: only VISSL's ViT), and SyncBatchNorm conversion happens on GPUs only.
    """
    # patch order: patches.py imports this module before it patches VISSL
    from vissl.models import build_model
    from vissl.models.model_helpers import get_no_ddp_model

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


def init_memory(self, dataloader, model) -> None:
    """Upstream `DeepClusterV2Loss.init_memory` on the loss's device.

    Upstream: vissl/losses/deepclusterv2_loss.py:112-136 (DeepClusterV2Loss.init_memory). Differs from upstream: tensors go to the loss's device instead of .cuda().
    """
    # patch order: patches.py imports this module before it patches VISSL
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


def cluster_memory(self) -> None:
    """Upstream `DeepClusterV2Loss.cluster_memory` (distributed k-means) on the loss's device.

    Upstream: vissl/losses/deepclusterv2_loss.py:148-207 (DeepClusterV2Loss.cluster_memory). Differs from upstream: tensors go to the loss's device instead of .cuda().
    """
    # patch order: patches.py imports this module before it patches VISSL
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


def disk_image(self, idx: int) -> tuple[Any, bool]:
    """Upstream `DiskImageDataset.__getitem__`, reading each image once and as
    8-bit RGB (`convit_ssl.images.open_image`). Upstream indexes the
    ImageFolder, which decodes the image, before its try, again inside it and
    again in its warning: every folder image was decoded twice, and an
    unreadable one raised instead of becoming the grey image the code intends.

    Upstream: vissl/data/disk_dataset.py:122-168 (DiskImageDataset.__getitem__). Differs from upstream: each image is read once, through convit_ssl.images.open_image (8-bit RGB), inside the try.
    """
    # patch order: patches.py imports this module before it patches VISSL
    from iopath.common.file_io import g_pathmgr
    from vissl.data.data_helper import get_mean_image

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


def extract(self, output_folder: str) -> None:
    """Upstream `SelfSupervisionTrainer.extract` on the task's device (GPU or CPU).

    Upstream: vissl/trainer/trainer_main.py:335-368 (SelfSupervisionTrainer.extract). Differs from upstream: no GPU assertion.
    """
    # patch order: patches.py imports this module before it patches VISSL
    from classy_vision.generic.distributed_util import is_primary
    from vissl.models.model_helpers import get_trunk_output_feature_names

    self.task.prepare_extraction(pin_memory=self.cfg.DATA.PIN_MEMORY)
    self._add_dummy_layer()
    self.task.init_distributed_data_parallel_model()
    if is_primary():
        logging.info(f"Model is:\n {self.task.model}")  # noqa: LOG015
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


def extract_split_features(self, feat_names, task, split_name: str, output_folder: str) -> None:
    """Upstream `SelfSupervisionTrainer._extract_split_features` with each batch on the task's device.

    Upstream: vissl/trainer/trainer_main.py:415-482 (SelfSupervisionTrainer._extract_split_features). Differs from upstream: each batch goes to the task's device instead of .cuda().
    """
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
            self._save_extracted_features(
                features=out_features,
                targets=out_targets,
                dist_rank=dist_rank,
                chunk_index=chunk_index,
                split=split_name,
                output_folder=output_folder,
            )
            for layer_name in out_features:
                out_features[layer_name].clear()
            chunk_index += 1
            feature_buffer_size = 0
    self._save_extracted_features(
        features=out_features,
        targets=out_targets,
        dist_rank=dist_rank,
        chunk_index=chunk_index,
        split=split_name,
        output_folder=output_folder,
    )


def low_shot_test(self, features, targets, sample_num, low_shot_kvalue) -> None:
    """Upstream `SVMLowShotTrainer.test`, storing each cost's mean AP as a scalar.

    Upstream: vissl/utils/svm_utils/svm_low_shot_trainer.py:141-186 (SVMLowShotTrainer.test). Differs from upstream: each cost's mean AP is stored as a float, not a 1-element array.
    """
    # patch order: patches.py imports this module before it patches VISSL
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


def recreate_data_iterator(self, phase_type: str, epoch: int, compute_start_iter: bool, train_phase_idx: int) -> None:
    """Upstream `SelfSupervisionTask.recreate_data_iterator`, with the old iterator's
    full garbage collection only where it can free something it is there for.

    Upstream: vissl/trainer/train_task.py:515-564 (SelfSupervisionTask.recreate_data_iterator). Differs from upstream: the
    `gc.collect()` after deleting the old iterator runs only when the loader has worker processes
    (`DATA.NUM_DATALOADER_WORKERS` > 0), whose shutdown it hastens; with none, it only cost
    about 0.15 s of every phase (a run of 330 one-iteration epochs on a 5 % subset spent half
    its time there). The rebuilt-dataloader branch (never taken by VISSL's own datasets) is upstream's.
    """
    # patch order: patches.py imports this module before it patches VISSL
    from vissl.data import build_dataloader

    start_iter = 0
    if compute_start_iter:
        start_iter = self._compute_start_iter_from_checkpoint(phase_type)
    self.set_epoch(phase_type, epoch, start_iter, train_phase_idx)
    sampler_seed = self.config["SEED_VALUE"]
    dataset = self.datasets[phase_type]
    if dataset.rebuild_dataloader():
        dataloader = build_dataloader(
            dataset=dataset,
            dataset_config=self.config.DATA[phase_type.upper()],
            num_dataloader_workers=self.config.DATA.NUM_DATALOADER_WORKERS,
            pin_memory=self.config.DATA.PIN_MEMORY,
            multi_processing_method=self.config.MULTI_PROCESSING_METHOD,
            device=self.device,
            sampler_seed=sampler_seed,
            split=phase_type,
        )
        del self.dataloaders[phase_type]
        gc.collect()
        self.dataloaders[phase_type] = dataloader
    del self.data_iterator
    if self.config.DATA.NUM_DATALOADER_WORKERS > 0:
        gc.collect()
    self.data_iterator = iter(self.dataloaders[phase_type])
