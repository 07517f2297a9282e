"""DeepCluster-v2's distributed k-means (upstream.cluster_memory) on WORLD gloo
processes, each holding a consecutive share of the memory bank in MEMORY (a
tensor file); rank 0 saves the assignments and centroids to OUT.

    python tests/kmeans_ranks.py MEMORY CLUSTERS WORLD OUT

Run by helpers.kmeans_on_ranks in a fork of the warm Python (tests/warm.py).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from convit_ssl.vissl.compat import upstream
from helpers import free_port  # tests/ is on the warm child's sys.path, as on its parent's


def _rank(rank: int, world: int, port: int, memory: torch.Tensor, clusters: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    share = len(memory) // world
    loss = SimpleNamespace(
        local_memory_embeddings=memory[rank * share : (rank + 1) * share].unsqueeze(0).clone(),
        local_memory_index=torch.arange(rank * share, (rank + 1) * share),
        num_clusters=[clusters],
        embedding_dim=memory.shape[1],
        nmb_kmeans_iters=10,
        nmb_mbs=1,
        assignments=-100 * torch.ones(1, len(memory), dtype=torch.long),
        centroids0=torch.zeros(clusters, memory.shape[1]),
    )
    # rank 0 starts from its first `clusters` embeddings, whatever the world size
    torch.randperm = lambda n, *args, **kwargs: torch.arange(n)
    upstream.cluster_memory(loss)
    if rank == 0:
        torch.save({"assignments": loss.assignments[0], "centroids": loss.centroids0}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    memory_file, clusters, world, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    memory = torch.load(memory_file)
    mp.spawn(_rank, args=(world, free_port(), memory, clusters, out), nprocs=world)
