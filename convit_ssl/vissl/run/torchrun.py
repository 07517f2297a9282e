"""Ranks that torchrun started (torch.distributed.run, TorchElastic), or any
launcher that starts one process per rank with torch's environment:
Kubernetes' PyTorchJob, TorchX, Ray and the cloud platforms' PyTorch jobs.

They set ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun also ``GROUP_RANK``, the node).
`derived_overrides` turns them into VISSL's keys before the config is
composed, so that everything computed from the run's shape (the learning-rate
scaling, the sampler's shards, the checkpoint folder) is what a VISSL-launched
run of the same shape computes: ``DISTRIBUTED.NUM_NODES`` = WORLD_SIZE /
LOCAL_WORLD_SIZE, ``NUM_PROC_PER_NODE`` = LOCAL_WORLD_SIZE, ``node_id`` = the
node, and ``INIT_METHOD: env`` (the process group meets at torchrun's store,
``env://``). A key the command line sets that disagrees is refused in one line
that shows both. Each process then trains as its rank (`launcher.launch_rank`)
instead of spawning ranks.

Imports nothing of VISSL (`ranks` asks `started_by_torchrun`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.distributed as dist

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Shape:
    """Where this process sits in the run torchrun started."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node: int

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    def keys(self) -> dict[str, int]:
        """VISSL's keys of this shape, as the command line spells them."""
        return {
            "config.DISTRIBUTED.NUM_NODES": self.num_nodes,
            "config.DISTRIBUTED.NUM_PROC_PER_NODE": self.local_world_size,
            "node_id": self.node,
        }

    def describe(self) -> str:
        return (
            f"torchrun started {self.local_world_size} process(es) on each of {self.num_nodes} node(s) "
            f"(WORLD_SIZE={self.world_size}, LOCAL_WORLD_SIZE={self.local_world_size}; this is rank {self.rank} "
            f"on node {self.node})"
        )


def started_by_torchrun(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is one rank of a run that torch's environment describes."""
    return all(key in env for key in ENV)


def shape(env: Mapping[str, str] = os.environ) -> Shape:
    """The run's shape from the environment; ValueError in one line where VISSL cannot run it."""
    try:
        rank, local_rank, world, local_world = (int(env[k]) for k in ENV[:4])
    except ValueError:
        raise ValueError(f"torch's environment is not numbers: {', '.join(f'{k}={env[k]}' for k in ENV[:4])}") from None
    if local_world < 1 or world % local_world:
        raise ValueError(
            f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}: VISSL runs the same "
            "number of processes on every node"
        )
    node = int(env.get("GROUP_RANK", rank // local_world))
    if rank != node * local_world + local_rank:
        raise ValueError(
            f"RANK={rank} is not node {node} x LOCAL_WORLD_SIZE={local_world} + LOCAL_RANK={local_rank}: "
            "VISSL numbers the ranks node by node"
        )
    return Shape(rank, local_rank, world, local_world, node)


def _explicit(overrides: Sequence[str]) -> dict[str, str]:
    """The command line's own settings of VISSL's shape keys (the last one of each)."""
    found = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep:
            found[key.lstrip("+~")] = value
    return found


def derived_overrides(overrides: Sequence[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """`overrides` plus VISSL's distributed keys derived from torch's environment;
    ValueError in one line for a key the command line sets otherwise."""
    run = shape(env)
    explicit = _explicit(overrides)
    for key, value in run.keys().items():
        if key in explicit and explicit[key].strip() != str(value):
            raise ValueError(
                f"{run.describe()}, but the command line sets {key}={explicit[key]} ({value} here): leave the key "
                "out under torchrun, or make them agree"
            )
    if explicit.get("config.SLURM.USE_SLURM", "false").strip().lower() == "true":
        raise ValueError(f"{run.describe()}: config.SLURM.USE_SLURM=true would submit another job from every rank")
    derived = [f"{key}={value}" for key, value in run.keys().items()]
    return [*overrides, *derived, "config.DISTRIBUTED.INIT_METHOD=env"]


def init_process_group(backend: str, run: Shape, env: Mapping[str, str] = os.environ) -> None:
    """The rank's process group, before VISSL's trainer (which then keeps it).

    Under torchrun the ranks meet at the agent's store (TORCHELASTIC_USE_AGENT_STORE).
    When torchrun restarts the group (--max-restarts), the restarted ranks find
    that store as the failed ones left it: torch's ``env://`` adds no prefix of
    the attempt (it expects a new store per attempt), so a restarted rank read
    the dead rank 0's gloo address and failed ("connectFullMesh failed ...
    Connection refused"), and the group never formed again. Here each attempt's
    keys get their own prefix (TORCHELASTIC_RESTART_COUNT). Without the agent's
    store (another launcher), VISSL's ``env://`` rendezvous is used as it is.
    """
    if dist.is_initialized() or env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), run.world_size, is_master=False)
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"convit_ssl/attempt_{attempt}", store),
        rank=run.rank,
        world_size=run.world_size,
    )
