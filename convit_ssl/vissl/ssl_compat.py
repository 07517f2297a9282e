"""Fixes VISSL 0.1.6 needs to run its self-supervised methods with the
`convit_ssl` trunk and on machines without a GPU. `apply()` is idempotent;
each patch names the upstream lines it answers.

- DINO: VISSL's hook builds the teacher "without stochastic depth" by zeroing
  `MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE`
  (vissl/hooks/dino_hooks.py:48), a key only VISSL's own ViT reads; the teacher
  is never put in eval mode, so a `convit_ssl` teacher would keep the
  student's stochastic depth. The patch zeroes `MODEL.TRUNK.CONVIT_SSL.DROP_PATH_RATE`
  as well before the teacher is built.
- DeepCluster-v2: the memory bank and k-means call `.cuda()` unconditionally
  (vissl/losses/deepclusterv2_loss.py:118, 123, 156, 179, 180), which fails
  without a GPU. The patched methods are upstream's with every tensor placed
  on the loss's own device (its buffers follow the task's device), so on a
  GPU they do exactly what upstream does.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from convit_ssl.vissl.trunk import CONFIG_BLOCK, TRUNK_NAME

_APPLIED: list[str] = []


def patch_dino_teacher_drop_path() -> None:
    """Build DINO's teacher from a `convit_ssl` trunk without stochastic depth."""
    from vissl.hooks.dino_hooks import DINOHook

    original = DINOHook._build_momentum_network
    if getattr(original, "__convit_ssl_patch__", False):
        return

    @functools.wraps(original)
    def _build_momentum_network(self, task: Any) -> None:
        trunk = task.config["MODEL"]["TRUNK"]
        if trunk["NAME"] == TRUNK_NAME and trunk.get(CONFIG_BLOCK) is not None:
            trunk[CONFIG_BLOCK]["DROP_PATH_RATE"] = 0.0
        original(self, task)

    _build_momentum_network.__convit_ssl_patch__ = True  # type: ignore[attr-defined]
    DINOHook._build_momentum_network = _build_momentum_network
    _APPLIED.append("DINOHook teacher without stochastic depth")


# The two methods below are upstream's, line for line, but for the device; they
# log through the root logger as upstream does (VISSL's log handlers sit there).


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


def patch_deepclusterv2_device() -> None:
    """Run DeepCluster-v2's memory bank and k-means on the task's device."""
    from vissl.losses.deepclusterv2_loss import DeepClusterV2Loss

    if DeepClusterV2Loss.init_memory is _init_memory:
        return
    DeepClusterV2Loss.init_memory = _init_memory
    DeepClusterV2Loss.cluster_memory = _cluster_memory
    _APPLIED.append("DeepClusterV2Loss on the task's device")


def applied() -> list[str]:
    """The patches applied so far in this process."""
    return list(_APPLIED)


def apply() -> list[str]:
    """Apply every patch (idempotent); return the names applied so far."""
    patch_dino_teacher_drop_path()
    patch_deepclusterv2_device()
    return applied()
