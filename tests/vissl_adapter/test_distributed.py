"""Distributed runs as a user relies on them on a cluster, proved on this
machine (CPU, gloo): the same numbers on 1 process and on 2 for the supervised
recipe and every self-supervised method; two nodes on loopback and across two
network namespaces; a killed rank or node ends the job; relaunching resumes to
the weights of an uninterrupted run, random augmentation included; torchrun as
the launcher (the same weights, two agents in two namespaces, SIGTERM to the
agent, a rank killed under --max-restarts). docs/RECIPES.md ("What is the same on 1
and on N processes") states the results for users.

What has to be held fixed for 1 and N processes to agree: VISSL seeds each
rank differently, so random augmentation is replaced by whole-image views
(ImgPilToMultiCrop with scale [1, 1]: the recipe's crop sizes and counts,
nothing random); stochastic depth is off; the supervised recipe's mixup /
cutmix is off (prob 0: it pairs images inside each rank's batch; label
smoothing stays). The global batch is the same: 1 x B against 2 x B/2. The
self-supervised twins train with SGD (see SGD), BatchNorm-free heads (CPUs
have no SyncBatchNorm), and Barlow Twins with twice the lr on 2 processes
(see BARLOW_TWINS_ON_N); DeepCluster-v2's k-means starts from rank 0's part of
the memory bank, so its distributed k-means is checked from a common start.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from convit_ssl.checkpoints import run_folder
from helpers import RUN_SCRIPT, WarmProcess, folder_overrides, free_port, start_warm

Process = subprocess.Popen | WarmProcess  # a launch: a command, or a fork of the warm Python

pytestmark = pytest.mark.slow

SSL_DIR = "test/convit_ssl/ssl"


def full_image_crops(sizes: Sequence[int], resize: int | None = None) -> str:
    """The TRANSFORMS override: len(sizes) whole-image views at those sizes (each
    resized to `resize` if given, so that a smaller view is a blurred copy of the
    first, deterministically), normalised."""
    uniq = sorted(set(sizes), reverse=True)
    crops = (
        f"{{name:ImgPilToMultiCrop,total_num_crops:{len(sizes)},size_crops:[{','.join(map(str, uniq))}],"
        f"num_crops:[{','.join(str(list(sizes).count(s)) for s in uniq)}],"
        f"crop_scales:[{','.join('[1,1]' for _ in uniq)}]}}"
    )
    steps = [
        crops,
        *([f"{{name:Resize,size:{resize}}}"] if resize else []),
        "{name:ToTensor}",
        "{name:Normalize,mean:[0.5,0.5,0.5],std:[0.25,0.25,0.25]}",
    ]
    return f"config.DATA.TRAIN.TRANSFORMS=[{','.join(steps)}]"


NO_BN_BARLOW_HEAD = (
    "config.MODEL.HEAD.PARAMS=["
    + ",".join(
        f"[mlp,{{dims:[{d},256],use_relu:true,use_bn:false,use_bias:false,skip_last_layer_relu_bn:false}}]"
        for d in (48, 256)
    )
    + ",[mlp,{dims:[256,256],use_bias:false}]]"
)
NO_BN_SWAV_HEAD = "config.MODEL.HEAD.PARAMS=[[swav_head,{dims:[48,2048,128],use_bn:false,num_clusters:[3000]}]]"

# Two different views, deterministically: the image at 32 px, and at 24 px resized
# to 32 (identical views make many gradients vanish analytically, and then
# rounding decides them: Barlow Twins' diagonal, MoCo's positives).
TWO_VIEWS = full_image_crops([32, 24], resize=32)
# method -> overrides of its tiny twin that make its inputs deterministic
SSL_TWINS: dict[str, list[str]] = {
    "simclr": [f"config={SSL_DIR}/simclr_micro_synthetic", TWO_VIEWS],
    "moco": [f"config={SSL_DIR}/moco_micro_synthetic", TWO_VIEWS],
    "barlow_twins": [
        f"config={SSL_DIR}/barlow_twins_micro_synthetic",
        TWO_VIEWS,
        NO_BN_BARLOW_HEAD,
        "config.OPTIMIZER.weight_decay=0",
    ],  # see BARLOW_TWINS_ON_N
    "swav": [f"config={SSL_DIR}/swav_micro_synthetic", full_image_crops([32] * 2 + [16] * 6), NO_BN_SWAV_HEAD],
    "dino": [f"config={SSL_DIR}/dino_micro_synthetic", full_image_crops([32] * 2 + [16] * 10)],
    "deepclusterv2": [
        f"config={SSL_DIR}/deepclusterv2_micro_synthetic",
        TWO_VIEWS,
        "config.LOSS.deepclusterv2_loss.num_clusters=[6,6,6]",
    ],  # <= rank 0's 6 samples
}
# Barlow Twins' gradient on N processes is 1/N of the gradient on one (VISSL's
# loss, like the official code, all-reduces the cross-correlation in place, which
# autograd does not see, and DDP then averages): with SGD, 2 processes at twice the
# lr (and no weight decay, which would double too) take the steps of 1 process.
# Adam and LARS are almost blind to the gradient's scale (not quite: eps, weight decay).
BARLOW_TWINS_ON_N = {"barlow_twins": ["config.OPTIMIZER.param_schedulers.lr.value=0.02"]}
NO_DROP_PATH = "config.MODEL.TRUNK.CONVIT_SSL.DROP_PATH_RATE=0"
# The twins' schedules scale the lr to their batch of 4 (about 4e-6), and AdamW's
# first steps are +-lr whatever a gradient's size, so rounding-level gradients
# (near zero) become whole steps that differ between runs (measured: 0.27 % of
# Barlow Twins' weights, by up to 3.7e-4, after 3 steps at lr 1e-3). SGD's step
# is the gradient times the lr, so the weights compare the gradients themselves:
# SGD with momentum at a constant lr 0.01.
SGD = [
    "config.OPTIMIZER.name=sgd",
    "config.OPTIMIZER.momentum=0.9",
    "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=false",
    "config.OPTIMIZER.param_schedulers.lr.name=constant",
    "config.OPTIMIZER.param_schedulers.lr.value=0.01",
]


def supervised_twin(digits: Path) -> list[str]:
    """The supervised recipe twin (repeated augmentation, label smoothing, AdamW
    groups, warm-up + cosine) on 32 digits, 4 epochs with a checkpoint after each
    (auto-resume on, as in the recipe), deterministic inputs."""
    return [
        "config=test/convit_ssl/recipe/supervised_recipe_micro_folder",
        *folder_overrides(digits),
        "config.TEST_MODEL=False",
        "config.DATA.TRAIN.DATA_LIMIT=32",
        "config.OPTIMIZER.num_epochs=4",
        "config.DATA.TRAIN.TRANSFORMS=[{name:Resize,size:32},{name:ToTensor},"
        "{name:Normalize,mean:[0.3,0.3,0.3],std:[0.4,0.4,0.4]}]",
        "config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.prob=0.0",
        NO_DROP_PATH,
        # the recipe's lr (5e-4 at batch 512) at the twin's batch of 8, so that weights move
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_lr_batch_size=8",
    ]


# ----------------------------------------------------------------------------
# Launching: one node, or several nodes each started as its own command.
# ----------------------------------------------------------------------------


def launch(
    overrides: Sequence[str],
    checkpoint_dir: Path,
    nodes: int = 1,
    procs: int = 1,
    host: str = "127.0.0.1",
    prefix: Sequence[Sequence[str]] = (),
) -> list[Process]:
    """Start `nodes` commands (`node_id=K` each, a tcp rendezvous on `host`), each
    of `procs` processes. `prefix[k]` goes before node k's command (`ip netns exec ...`)."""
    world = [
        f"config.DISTRIBUTED.NUM_NODES={nodes}",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}",
        f"config.CHECKPOINT.DIR={checkpoint_dir}",
    ]
    if nodes > 1:
        world += ["config.DISTRIBUTED.INIT_METHOD=tcp", f"config.DISTRIBUTED.RUN_ID={host}:{free_port()}"]
    started = []
    for node in range(nodes):
        arguments = [str(RUN_SCRIPT), *overrides, *world, f"node_id={node}"]
        log = checkpoint_dir.parent / f"{checkpoint_dir.name}.node{node}.log"
        if not prefix:  # a fork of the warm Python (helpers.start_warm)
            started.append(start_warm(arguments, checkpoint_dir.parent, log))
            continue
        with open(log, "w") as out:  # the child keeps it
            started.append(
                subprocess.Popen(
                    [*prefix[node], sys.executable, *arguments],
                    cwd=checkpoint_dir.parent,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=dict(os.environ, PYTHONWARNINGS="ignore"),
                )
            )
    return started


def wait(started: list[Process], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.time())) for p in started]
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


@dataclass
class Run:
    losses: list[float]  # per iteration, as VISSL logs them (all-reduced over ranks, 5 digits)
    weights: dict[str, torch.Tensor]
    loss_state: dict[str, torch.Tensor]
    seconds: float


def read_run(checkpoint_dir: Path, seconds: float = math.nan) -> Run:
    final = run_folder.final_checkpoint(checkpoint_dir)
    assert final is not None, sorted(p.name for p in checkpoint_dir.iterdir())
    state = torch.load(final, map_location="cpu", weights_only=False)["classy_state_dict"]
    model = state["base_model"]["model"]
    weights = {f"{part}.{name}": value for part in ("trunk", "heads") for name, value in model[part].items()}
    return Run(run_folder.losses(checkpoint_dir), weights, state["loss"], seconds)


def train(
    overrides: Sequence[str], checkpoint_dir: Path, nodes: int = 1, procs: int = 1, timeout: float = 300, **kwargs
) -> Run:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    codes = wait(launch(overrides, checkpoint_dir, nodes, procs, **kwargs), timeout)
    logs = "".join(
        (checkpoint_dir.parent / f"{checkpoint_dir.name}.node{k}.log").read_text()[-4000:] for k in range(nodes)
    )
    assert codes == [0] * nodes, logs
    return read_run(checkpoint_dir, time.time() - start)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _batch(batch: int) -> str:
    return f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}"


# ----------------------------------------------------------------------------
# 1. The same numbers on 1 and on 2 processes.
# ----------------------------------------------------------------------------

# Measured (fp32, gloo): losses equal to the 5 digits VISSL logs; largest weight
# difference 6e-8 for the supervised recipe (AdamW, 16 steps), 1.5e-8 to 3.8e-7 for
# the SGD twins, 3.0e-5 for Barlow Twins (2.8 % of its weights above 1e-6). AdamW
# turns rounding-level gradients into whole steps where a gradient is near zero:
# before the recipe kept its 1e-6 warm-up start, 6 of 95082 weights differed by up
# to 9e-5, hence its looser bound.
LOSS_TOLERANCE = {
    "default": 5e-5,  # relative
    # Barlow Twins' loss sums 65536 squared correlations: measured 3.8e-5 (2 threads), 6.9e-5 (1)
    "barlow_twins": 2e-4,
}
ADAMW_TOLERANCE = (2e-4, 1e-3)  # largest element difference; fraction above 1e-6
SGD_TOLERANCE = {
    "default": (1e-5, 0.0),
    # its loss sums 65536 squared correlations: the largest rounding (measured 3.0e-5, 2.8 %)
    "barlow_twins": (1e-4, 0.05),
}


# Parameters whose gradient is zero analytically, so only rounding moves them, by
# Adam's normalised steps of about lr each: a GPSA head's positional scores go
# through a softmax, which a constant added to all of them (pos_proj's bias) leaves unchanged.
ROUNDING_ONLY = (".attn.pos_proj.bias",)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: tuple[float, float]) -> None:
    largest, stray_fraction = tolerance
    assert a.keys() == b.keys()
    compared = [k for k in a if a[k].is_floating_point() and not k.endswith(ROUNDING_ONLY)]
    differences = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in compared])
    stray = (differences > 1e-6).double().mean().item()
    print(f"weights: largest difference {differences.max().item():.2g}, {stray:.2%} of {len(differences)} above 1e-6")
    assert differences.max().item() <= largest and stray <= stray_fraction, (differences.max().item(), stray)


def assert_same_losses(a: list[float], b: list[float], method: str = "default") -> None:
    tolerance = LOSS_TOLERANCE.get(method, LOSS_TOLERANCE["default"])
    assert len(a) == len(b) > 0 and all(abs(x - y) <= tolerance * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)


@pytest.fixture(scope="module")
def supervised_runs(digits, tmp_path_factory) -> dict[str, Run]:
    """The supervised recipe twin at global batch 8: 1 x 8, 1 node x 2 x 4, 2 nodes x 1 x 4."""
    root = tmp_path_factory.mktemp("supervised")
    overrides = supervised_twin(digits)
    return {
        "1x1": train([*overrides, _batch(8)], root / "1x1"),
        "1x2": train([*overrides, _batch(4)], root / "1x2", procs=2),
        "2x1": train([*overrides, _batch(4)], root / "2x1", nodes=2),
    }


def test_supervised_recipe_agrees_on_1_and_2_processes(supervised_runs):
    one, two = supervised_runs["1x1"], supervised_runs["1x2"]
    assert len(one.losses) == 16  # 4 epochs x 32 images / 8
    assert_same_losses(one.losses, two.losses)
    assert_same_weights(one.weights, two.weights, ADAMW_TOLERANCE)
    assert one.losses[-1] < one.losses[0]  # and it trains


def test_two_nodes_equal_one_node_of_two_processes(supervised_runs):
    """Two commands with node_id=0 / 1 on a tcp rendezvous: bit-identical to one node
    of 2 processes (the same ranks, the same reductions, only the transport differs)."""
    one_node, two_nodes = supervised_runs["1x2"], supervised_runs["2x1"]
    assert two_nodes.losses == one_node.losses
    assert max_difference(two_nodes.weights, one_node.weights) == 0.0


def test_two_nodes_of_two_processes_equal_one_node_of_four(digits, tmp_path):
    """2 nodes x 2 processes against 1 node x 4 (global batch 8, 2 epochs): bit-identical."""
    overrides = [*supervised_twin(digits), "config.OPTIMIZER.num_epochs=2", _batch(2)]
    one_node = train(overrides, tmp_path / "1x4", procs=4)
    two_nodes = train(overrides, tmp_path / "2x2", nodes=2, procs=2)
    assert len(two_nodes.losses) == 8 and two_nodes.losses == one_node.losses
    assert max_difference(two_nodes.weights, one_node.weights) == 0.0


@pytest.mark.parametrize("method", sorted(SSL_TWINS))
def test_self_supervised_method_agrees_on_1_and_2_processes(method, tmp_path):
    overrides = [*SSL_TWINS[method], NO_DROP_PATH, *SGD]
    one = train([*overrides, _batch(4)], tmp_path / "p1")
    two = train([*overrides, _batch(2), *BARLOW_TWINS_ON_N.get(method, [])], tmp_path / "p2", procs=2)
    assert len(one.losses) == len(two.losses) > 0
    if method == "deepclusterv2":
        # k-means starts from rank 0's memory, which differs with the number of ranks;
        # test_deepclusterv2_kmeans_on_2_processes checks the distributed k-means itself.
        assignments = two.loss_state["assignments"]
        assert assignments.shape == (3, 12) and (assignments >= 0).all() and (assignments < 6).all()
        return
    assert_same_losses(one.losses, two.losses, method)
    assert_same_weights(one.weights, two.weights, SGD_TOLERANCE.get(method, SGD_TOLERANCE["default"]))
    if method == "moco":
        # The queue: rank 0's random start everywhere (patches, "MoCo queue shared by
        # every rank"), then the same 12 keys (3 steps x 4), gathered in rank order.
        filled = 12
        assert torch.equal(one.loss_state["queue"][:, filled:], two.loss_state["queue"][:, filled:])
        keys_one, keys_two = one.loss_state["queue"][:, :filled].T, two.loss_state["queue"][:, :filled].T
        assert torch.cdist(keys_one, keys_two).min(dim=1).values.max() < 1e-5
    if method == "dino":  # the all-reduced centre and the teacher
        assert torch.allclose(one.loss_state["center"], two.loss_state["center"], atol=1e-5)


def test_deepclusterv2_kmeans_on_2_processes(tmp_path):
    """VISSL's distributed k-means (our device-agnostic copy, upstream.cluster_memory)
    on 2 ranks holding half the memory bank each gives the centroids and
    assignments of 1 process holding all of it, from the same initial centroids."""
    from helpers import kmeans_on_ranks

    torch.manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    one = kmeans_on_ranks(memory, clusters=3, world=1, out=tmp_path / "one")
    two = kmeans_on_ranks(memory, clusters=3, world=2, out=tmp_path / "two")
    assert torch.equal(one["assignments"], two["assignments"])
    assert len(set(one["assignments"].tolist())) > 1
    assert torch.allclose(one["centroids"], two["centroids"], atol=1e-6)


# ----------------------------------------------------------------------------
# 2. Two hosts: one node in each of two network namespaces.
# ----------------------------------------------------------------------------


class Namespaces:
    """Two network namespaces joined by a veth pair, 10.231.<n>.1 and .2/24."""

    def __init__(self, tag: str) -> None:
        self.names = [f"cs{tag}a", f"cs{tag}b"]
        self.devices = [f"vcs{tag}a", f"vcs{tag}b"]
        self.addresses = [f"10.231.{int(tag) % 250}.1", f"10.231.{int(tag) % 250}.2"]

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def create(self) -> None:
        for name in self.names:
            self._ip("netns", "add", name)
        self._ip("link", "add", self.devices[0], "type", "veth", "peer", "name", self.devices[1])
        for name, device, address in zip(self.names, self.devices, self.addresses):
            self._ip("link", "set", device, "netns", name)
            self._ip("-n", name, "addr", "add", f"{address}/24", "dev", device)
            self._ip("-n", name, "link", "set", device, "up")
            self._ip("-n", name, "link", "set", "lo", "up")

    def delete(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)

    def prefix(self, node: int) -> list[str]:
        """Run in namespace `node`; gloo talks over its veth (not its loopback)."""
        return ["ip", "netns", "exec", self.names[node], "env", f"GLOO_SOCKET_IFNAME={self.devices[node]}"]


@pytest.fixture(scope="module")
def namespaces():
    if shutil.which("ip") is None:
        pytest.skip("two-host test: the `ip` command (iproute2) is not installed")
    spaces = Namespaces(str(os.getpid() % 10000))
    try:
        spaces.create()
    except subprocess.CalledProcessError as error:
        spaces.delete()
        pytest.skip(f"two-host test: cannot make network namespaces here (needs root): {error.stderr.strip()}")
    yield spaces
    spaces.delete()


def test_two_hosts_equal_one_node_of_two_processes(supervised_runs, namespaces, digits, tmp_path):
    """Node 0 in one namespace, node 1 in the other, node 0's address as the rendezvous."""
    overrides = [*supervised_twin(digits), _batch(4)]
    run = train(
        overrides,
        tmp_path / "ck",
        nodes=2,
        host=namespaces.addresses[0],
        prefix=[namespaces.prefix(0), namespaces.prefix(1)],
    )
    log = (tmp_path / "ck.node1.log").read_text()
    assert namespaces.addresses[0] in log  # node 1 reached node 0 over the veth pair
    assert run.losses == supervised_runs["1x2"].losses
    assert max_difference(run.weights, supervised_runs["1x2"].weights) == 0.0


# ----------------------------------------------------------------------------
# 3. A lost rank: the job ends, no checkpoint is damaged, relaunching resumes.
# ----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _rank_processes(launcher: Process) -> list[int]:
    """The ranks torch.multiprocessing started under a launcher (spawned or
    forked: helpers.start_warm), not its resource tracker."""
    ranks = []
    for pid in _children(launcher.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except FileNotFoundError:
            continue
        if "resource_tracker" not in cmdline:
            ranks.append(pid)
    return sorted(ranks)


def _wait_for_checkpoint(checkpoint_dir: Path, name: str, started: list[Process], timeout: float = 240) -> None:
    """Until `name` exists: the run is then at the start of the next epoch."""
    deadline = time.time() + timeout
    while not (checkpoint_dir / name).exists():
        assert all(p.poll() is None for p in started), "the run ended before it could be interrupted"
        assert time.time() < deadline, f"no {name} within {timeout} s"
        time.sleep(0.02)


def _all_checkpoints_load(checkpoint_dir: Path) -> list[str]:
    names = sorted(p.name for p in checkpoint_dir.glob("*.torch"))
    for name in names:
        torch.load(checkpoint_dir / name, map_location="cpu", weights_only=False)
    return names


@pytest.mark.parametrize("procs", [1, 2])
def test_killed_rank_ends_the_job_and_relaunch_resumes(procs, supervised_runs, digits, tmp_path):
    """Killed as the second of 4 epochs starts; relaunched, it finishes with the
    weights of the uninterrupted run of the same command (supervised_runs)."""
    overrides = [*supervised_twin(digits), _batch(8 // procs)]
    uninterrupted = supervised_runs[f"1x{procs}"]

    checkpoint_dir = tmp_path / "ck"
    checkpoint_dir.mkdir()
    started = launch(overrides, checkpoint_dir, procs=procs)
    _wait_for_checkpoint(checkpoint_dir, "model_phase0.torch", started)
    victim = _rank_processes(started[0])[-1] if procs > 1 else started[0].pid
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    codes = wait(started, timeout=60)
    ended_after = time.time() - killed_at
    print(f"{procs} process(es): the launch ended {ended_after:.2f} s after the kill, exit {codes[0]}")
    assert codes[0] != 0
    assert ended_after < 10, ended_after
    assert not _rank_processes(started[0])  # no orphaned rank
    names = _all_checkpoints_load(checkpoint_dir)
    assert "model_phase0.torch" in names and not any(n.startswith("model_final") for n in names), names

    resumed = train(overrides, checkpoint_dir, procs=procs)
    log = (tmp_path / "ck.node0.log").read_text()
    # VISSL's own line (vissl/utils/checkpoint.py:625) names the checkpoint it resumed from
    assert re.search(rf"Resume from file: {re.escape(str(checkpoint_dir))}/(checkpoint|model_phase\d+)\.torch", log), (
        log[-3000:]
    )
    assert "Starting phase 0 [train]" not in log  # phase 0 was not trained again
    assert max_difference(resumed.weights, uninterrupted.weights) == 0.0


def test_preempted_run_resumes_bit_identically(supervised_runs, digits, tmp_path):
    """SIGTERM to the launcher of a 2-process run as its second of 4 epochs
    starts (a preemption): the ranks agree on an iteration, save it and exit
    (143). Relaunched, the run resumes from that iteration and ends with the
    weights and the per-step losses of the uninterrupted run: nothing lost,
    nothing trained twice."""
    overrides = [*supervised_twin(digits), _batch(4)]
    uninterrupted = supervised_runs["1x2"]
    checkpoint_dir = tmp_path / "ck"
    checkpoint_dir.mkdir()
    started = launch(overrides, checkpoint_dir, procs=2)
    _wait_for_checkpoint(checkpoint_dir, "model_phase0.torch", started)
    os.kill(started[0].pid, signal.SIGTERM)
    signalled = time.time()
    codes = wait(started, timeout=60)
    print(f"preempted: exit {codes[0]} {time.time() - signalled:.2f} s after SIGTERM")
    assert codes == [128 + signal.SIGTERM]
    assert not _rank_processes(started[0])
    saved = Path(os.path.realpath(checkpoint_dir / "checkpoint.torch")).name
    stopped_at = int(re.fullmatch(r"model_iteration(\d+)\.torch", saved).group(1))
    assert 4 < stopped_at < 8, saved  # mid-way through the second epoch (4 steps each)
    assert len(run_folder.losses(checkpoint_dir)) == stopped_at

    resumed = train(overrides, checkpoint_dir, procs=2)
    assert max_difference(resumed.weights, uninterrupted.weights) == 0.0
    assert resumed.losses == uninterrupted.losses  # 16 steps: stopped_at before, the rest after


# Every random stream in use: random crops and flips drawn in the ranks (0 loader
# workers), stochastic depth 0.1; 2 processes, 4 iterations per epoch each.
RANDOM_STREAMS = [
    "config=test/convit_ssl/supervised_micro_synthetic",
    "config.DATA.TRAIN.DATA_LIMIT=32",
    "config.OPTIMIZER.num_epochs=3",
]


@pytest.fixture(scope="module")
def random_stream_runs(tmp_path_factory) -> dict[str, Run]:
    """Uninterrupted runs under VISSL's default task and under convit_ssl_task."""
    root = tmp_path_factory.mktemp("random_streams")
    return {
        "default": train(RANDOM_STREAMS, root / "default", procs=2),
        "convit_ssl_task": train([*RANDOM_STREAMS, "config.TRAINER.TASK_NAME=convit_ssl_task"], root / "task", procs=2),
    }


def _preempt_and_resume(overrides: list[str], checkpoint_dir: Path) -> tuple[str, Run]:
    """SIGTERM to the launcher once the first epoch's checkpoint exists; relaunched.
    Returns the checkpoint it resumed from and the finished run."""
    checkpoint_dir.mkdir()
    started = launch(overrides, checkpoint_dir, procs=2)
    _wait_for_checkpoint(checkpoint_dir, "model_phase0.torch", started)
    os.kill(started[0].pid, signal.SIGTERM)
    assert wait(started, timeout=60) == [128 + signal.SIGTERM]
    resumed_from = Path(os.path.realpath(checkpoint_dir / "checkpoint.torch")).name
    states = torch.load(checkpoint_dir / resumed_from, weights_only=True)["classy_state_dict"]["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # each rank's own
    return resumed_from, train(overrides, checkpoint_dir, procs=2)


def test_resume_is_exact_with_random_augmentation_under_vissls_default_task(random_stream_runs, tmp_path):
    """VISSL's default task cannot resume mid-epoch: the stopped run resumes from
    its last epoch's checkpoint, whose ranks' random-number states it carries
    (the patch "random-number states carried in checkpoints"), and ends with the
    uninterrupted run's weights. Without the patch: 2.1e-3 apart after 40 epochs."""
    resumed_from, resumed = _preempt_and_resume(RANDOM_STREAMS, tmp_path / "ck")
    assert re.fullmatch(r"model_phase\d\.torch", resumed_from), resumed_from
    assert max_difference(resumed.weights, random_stream_runs["default"].weights) == 0.0
    assert resumed.losses[-4:] == random_stream_runs["default"].losses[-4:]


def test_resume_mid_epoch_is_exact_with_random_augmentation(random_stream_runs, tmp_path):
    """convit_ssl_task resumes within the epoch (an iteration checkpoint) with each
    rank's generators where they stood."""
    overrides = [*RANDOM_STREAMS, "config.TRAINER.TASK_NAME=convit_ssl_task"]
    resumed_from, resumed = _preempt_and_resume(overrides, tmp_path / "ck")
    assert re.fullmatch(r"model_iteration([5-7])\.torch", resumed_from), resumed_from  # inside the second epoch
    assert max_difference(resumed.weights, random_stream_runs["convit_ssl_task"].weights) == 0.0
    assert resumed.losses == random_stream_runs["convit_ssl_task"].losses


def test_lost_node_ends_the_other_node(digits, tmp_path):
    """2 nodes x 1 process: node 1's rank is killed; node 0 learns of it only
    through the process group (gloo sees the connection close) and exits non-zero."""
    checkpoint_dir = tmp_path / "ck"
    checkpoint_dir.mkdir()
    started = launch([*supervised_twin(digits), _batch(4)], checkpoint_dir, nodes=2)
    _wait_for_checkpoint(checkpoint_dir, "model_phase0.torch", started)
    os.kill(_rank_processes(started[1])[0], signal.SIGKILL)
    killed_at = time.time()
    codes = wait(started, timeout=120)
    ended_after = time.time() - killed_at
    print(f"2 nodes: both ended {ended_after:.2f} s after the kill, exits {codes}")
    assert codes[0] != 0 and codes[1] != 0, codes
    assert ended_after < 30, ended_after
    _all_checkpoints_load(checkpoint_dir)


# ----------------------------------------------------------------------------
# 5. torchrun as the launcher: the same weights, stops and restarts that lose nothing.
# ----------------------------------------------------------------------------


def torchrun(
    torchrun_args: Sequence[str], overrides: Sequence[str], checkpoint_dir: Path, log: Path, prefix: Sequence[str] = ()
) -> subprocess.Popen:
    """`torchrun TORCHRUN_ARGS tools/run_distributed_engines.py OVERRIDES` (a plain process: no warm fork)."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    command = [*prefix, sys.executable, "-m", "torch.distributed.run", *torchrun_args, str(RUN_SCRIPT)]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*command, *overrides, f"config.CHECKPOINT.DIR={checkpoint_dir}"],
            cwd=checkpoint_dir.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
            start_new_session=True,  # its own process group: a stray worker cannot outlive the test
        )


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = _children(todo.pop())
        found += children
        todo += children
    return found


STANDALONE = ["--standalone", "--nproc-per-node", "2"]


def test_torchrun_gives_the_weights_of_vissls_launcher(random_stream_runs, tmp_path):
    """torchrun with 2 processes: each process is a rank (world size 2 from the
    environment), bit-identical to VISSL's launcher with NUM_PROC_PER_NODE=2.
    Both sides run one intra-op thread, as under `make test` (OMP_NUM_THREADS=1;
    torchrun's default for its workers): with 2 threads against 1 the rounding
    differs, 3.9e-5 here."""
    agent = torchrun(STANDALONE, RANDOM_STREAMS, tmp_path / "ck", tmp_path / "torchrun.log")
    assert agent.wait(timeout=300) == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    log = (tmp_path / "ck" / "log.txt").read_text()
    assert "Using Distributed init method: env://, world_size: 2, rank: 0" in log
    run = read_run(tmp_path / "ck")
    assert run.losses == random_stream_runs["default"].losses
    assert max_difference(run.weights, random_stream_runs["default"].weights) == 0.0


def test_torchrun_refuses_a_shape_that_disagrees(tmp_path):
    agent = torchrun(
        ["--standalone", "--nproc-per-node", "1"],
        [*RANDOM_STREAMS, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"],
        tmp_path / "ck",
        tmp_path / "torchrun.log",
    )
    assert agent.wait(timeout=120) != 0
    assert (
        "convit-ssl run: error: torchrun started 1 process(es) on each of 1 node(s) (WORLD_SIZE=1, "
        "LOCAL_WORLD_SIZE=1; this is rank 0 on node 0), but the command line sets "
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=2 (1 here): leave the key out under torchrun, or make them agree"
    ) in (tmp_path / "torchrun.log").read_text()
    assert not (tmp_path / "ck" / "train_config.yaml").exists()


def test_two_torchrun_agents_in_two_namespaces(random_stream_runs, namespaces, tmp_path):
    """Two hosts, one process each, meeting through the c10d rendezvous on the
    first one's address: the weights of one node of two processes. (torchrun
    recognises the rendezvous host, and tells the ranks where rank 0 is, by the
    host's name; both namespaces share this machine's, so each agent is given its
    address: is_host, --local-addr.)"""
    endpoint = f"{namespaces.addresses[0]}:{free_port()}"
    rendezvous = f"--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint {endpoint} --rdzv-id two-hosts"
    agents = [
        torchrun(
            [
                *rendezvous.split(),
                "--rdzv-conf",
                f"is_host={int(node == 0)}",
                "--local-addr",
                namespaces.addresses[node],
            ],
            RANDOM_STREAMS,
            tmp_path / f"ck{node}",
            tmp_path / f"agent{node}.log",
            prefix=namespaces.prefix(node),
        )
        for node in (0, 1)
    ]
    codes = wait(agents, timeout=300)
    assert codes == [0, 0], (tmp_path / "agent1.log").read_text()[-3000:]
    log = (tmp_path / "ck0" / "log.txt").read_text()  # rank 0's (VISSL logs to a file on rank 0 only)
    assert "Using Distributed init method: env://, world_size: 2, rank: 0" in log
    run = read_run(tmp_path / "ck0")  # rank 0 writes the checkpoints; each host has its own folder here
    assert max_difference(run.weights, random_stream_runs["default"].weights) == 0.0


def test_sigterm_to_the_torchrun_agent_stops_every_process_and_the_relaunch_resumes(random_stream_runs, tmp_path):
    checkpoint_dir = tmp_path / "ck"
    agent = torchrun(STANDALONE, RANDOM_STREAMS, checkpoint_dir, tmp_path / "stopped.log")
    _wait_for_checkpoint(checkpoint_dir, "model_phase0.torch", [agent])
    processes = [agent.pid, *_descendants(agent.pid)]
    os.kill(agent.pid, signal.SIGTERM)
    signalled = time.time()
    agent.wait(timeout=60)
    deadline = signalled + 30
    while any(Path(f"/proc/{pid}").exists() for pid in processes) and time.time() < deadline:
        time.sleep(0.05)
    gone_after = time.time() - signalled
    print(f"torchrun: every process gone {gone_after:.2f} s after SIGTERM to the agent")
    assert not any(Path(f"/proc/{pid}").exists() for pid in processes)
    assert gone_after < 15, gone_after
    stopped_log = (tmp_path / "stopped.log").read_text()
    assert "stopped by SIGTERM" in stopped_log, stopped_log[-3000:]
    assert os.path.exists(checkpoint_dir / "checkpoint.torch")

    relaunched = torchrun(STANDALONE, RANDOM_STREAMS, checkpoint_dir, tmp_path / "relaunched.log")
    assert relaunched.wait(timeout=300) == 0, (tmp_path / "relaunched.log").read_text()[-3000:]
    run = read_run(checkpoint_dir)
    assert max_difference(run.weights, random_stream_runs["default"].weights) == 0.0


def test_a_killed_rank_under_max_restarts_resumes_and_finishes(random_stream_runs, tmp_path):
    """SIGKILL to one rank: torchrun restarts the group (--max-restarts 1), the
    new ranks resume from the last epoch's checkpoint and the run ends with the
    uninterrupted run's weights (each checkpoint carries the ranks' random-number
    states; the killed epoch is trained again from its start)."""
    checkpoint_dir = tmp_path / "ck"
    agent = torchrun([*STANDALONE, "--max-restarts", "1"], RANDOM_STREAMS, checkpoint_dir, tmp_path / "agent.log")
    _wait_for_checkpoint(checkpoint_dir, "model_phase0.torch", [agent])
    victim = _children(agent.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    while not re.search(r"Resume from file", _node_log(tmp_path / "agent.log")) and time.time() < killed + 120:
        assert agent.poll() is None, _node_log(tmp_path / "agent.log")[-3000:]
        time.sleep(0.05)
    print(f"torchrun: the restarted ranks resumed {time.time() - killed:.2f} s after the kill")
    assert agent.wait(timeout=300) == 0, _node_log(tmp_path / "agent.log")[-3000:]
    assert "TORCHELASTIC_RESTART_COUNT:\t1" in _node_log(tmp_path / "agent.log")  # the second attempt trained
    run = read_run(checkpoint_dir)
    assert max_difference(run.weights, random_stream_runs["default"].weights) == 0.0


def _node_log(path: Path) -> str:
    return path.read_text(errors="replace")
