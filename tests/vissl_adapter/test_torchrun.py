"""torch's environment read as VISSL's distributed keys (convit_ssl.vissl.run.torchrun):
the shape of a run, the keys derived from it, and what is refused in one line.
The runs under torchrun itself: tests/vissl_adapter/test_distributed.py (section 5)."""

import pytest

from convit_ssl.vissl import benchmarks
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.run import ranks, torchrun


def env(rank, local_rank, world, local_world, **more):
    return {
        "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(local_world), "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", **more,
    }  # fmt: skip


def test_the_keys_of_a_two_node_run():
    derived = torchrun.derived_overrides(["config=X"], env(3, 1, 4, 2, GROUP_RANK="1"))
    assert derived == [
        "config=X",
        "config.DISTRIBUTED.NUM_NODES=2",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
        "node_id=1",
        "config.DISTRIBUTED.INIT_METHOD=env",
    ]
    # without GROUP_RANK (a PyTorchJob pod started without torchrun): the node from the rank
    assert "node_id=1" in torchrun.derived_overrides([], env(2, 0, 4, 2))


def test_explicit_keys_that_agree_are_kept_and_ones_that_disagree_refused():
    agreeing = ["config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "node_id=0"]
    assert torchrun.derived_overrides(agreeing, env(0, 0, 2, 2))[:2] == agreeing
    with pytest.raises(ValueError, match=r"^torchrun started 2 process\(es\) on each of 1 node\(s\) \(WORLD_SIZE=2, "):
        torchrun.derived_overrides(["config.DISTRIBUTED.NUM_NODES=2"], env(0, 0, 2, 2))
    with pytest.raises(ValueError, match=r"sets config.DISTRIBUTED.NUM_PROC_PER_NODE=8 \(2 here\)"):
        torchrun.derived_overrides(["+config.DISTRIBUTED.NUM_PROC_PER_NODE=8"], env(0, 0, 2, 2))
    with pytest.raises(ValueError, match=r"config.SLURM.USE_SLURM=true would submit another job from every rank"):
        torchrun.derived_overrides(["config.SLURM.USE_SLURM=true"], env(0, 0, 2, 2))


@pytest.mark.parametrize(
    "environment, message",
    [
        (env(0, 0, 3, 2), r"WORLD_SIZE=3 is not a multiple of LOCAL_WORLD_SIZE=2"),
        (env(1, 0, 4, 2, GROUP_RANK="0"), r"RANK=1 is not node 0 x LOCAL_WORLD_SIZE=2 \+ LOCAL_RANK=0"),
        (env("a", 0, 2, 2), r"torch's environment is not numbers: RANK=a"),
    ],
)
def test_shapes_vissl_cannot_run_are_refused(environment, message):
    with pytest.raises(ValueError, match=message):
        torchrun.shape(environment)


def test_detection_and_the_spawning_rule(monkeypatch):
    _, config = compose(["config=test/convit_ssl/supervised_micro_synthetic", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"])
    assert not torchrun.started_by_torchrun({"RANK": "0"})  # a partial environment is not torchrun's
    for key in torchrun.ENV:
        monkeypatch.delenv(key, raising=False)
    assert ranks.spawns_ranks(config)  # VISSL's launcher spawns the two ranks
    for key, value in env(0, 0, 2, 2).items():
        monkeypatch.setenv(key, value)
    assert not ranks.spawns_ranks(config)  # torchrun started them
    with pytest.raises(ValueError, match=r"the feature benchmarks run under VISSL's launcher"):
        benchmarks.prepare("knn", ["config=test/convit_ssl/supervised_micro_synthetic"])
