"""Each self-supervised loss VISSL ships, as this project runs it (patches
applied, built from the loss block of the shipped small-scale config
``pretrain/<method>/<method>_convit_demo_digits_32``), against an
implementation someone else wrote: lightly's losses, and for DeepCluster-v2
the official algorithm (facebookresearch/swav ``main_deepclusterv2.py``)
restated below. Identical fixed-seed embeddings, shaped like the small
configs' (batch, crops, dimensions), fp32; the loss value and its gradient with
respect to the embeddings are compared, and each method's state (MoCo's queue,
DINO's centre, SwAV's codes, DeepCluster-v2's clusters) after the step.

Where the two differ by design, the test measures the difference and says
why (Barlow Twins; docs/SSL_SMALL_SCALE.md, "What VISSL's losses compute").
No training here: each test is one to a few loss evaluations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss, DINOLoss, NTXentLoss, SwaVLoss
from lightly.loss.swav_loss import sinkhorn

from convit_ssl.vissl.compat import patches
from convit_ssl.vissl.configs import compose
from helpers import free_port

# fp32, the same operations in another order: a few units in the last place, summed over a batch
RTOL, ATOL = 1e-5, 1e-6


def small(method: str) -> str:
    """The shipped small-scale config of `method`."""
    folder = {"deepclusterv2": "deepcluster_v2"}.get(method, method)
    return f"pretrain/{folder}/{method}_convit_demo_digits_32"


def _built(config_name: str, loss: str) -> tuple[Any, Any]:
    """(the composed config, VISSL's loss built from its loss block as the trainer builds it)."""
    from classy_vision.losses import build_loss

    config = compose([f"config={config_name}"])[1]
    assert config.LOSS.name == loss
    block = config.LOSS[loss]
    block["name"] = loss
    return config, build_loss(block)


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """One gloo process on the CPU, as VISSL's trainer sets it up (MACHINE.DEVICE: cpu):
    VISSL's losses all-reduce their statistics unconditionally."""
    from classy_vision.generic import distributed_util

    patches.apply()
    device = distributed_util.get_cuda_device_index()
    distributed_util.set_cpu_device()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()
    distributed_util._cuda_device_index = device  # (its setter also selects a CUDA device)


def _leaf(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).requires_grad_()


def _value_and_grad(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    loss = loss_fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().reshape(()), grad


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> None:
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- SimCLR
def test_simclr_equals_lightly_ntxent():
    """VISSL's InfoNCE over [view 0 of the batch, view 1 of the batch] (2 x 128 x 128) is
    lightly's NT-Xent: each of the 2N embeddings against its partner and 2N - 2 negatives."""
    config, vissl_loss = _built(small("simclr"), "simclr_info_nce_loss")
    block = config.LOSS.simclr_info_nce_loss
    n = block.buffer_params.effective_batch_size // 2
    lightly_loss = NTXentLoss(temperature=block.temperature)
    z = _leaf(2 * n, block.buffer_params.embedding_dim, seed=0)

    ours, ours_grad = _value_and_grad(lambda x: vissl_loss(x, None), z)
    theirs, theirs_grad = _value_and_grad(lambda x: lightly_loss(x[:n], x[n:]), z)
    _assert_close(ours, theirs)
    _assert_close(ours_grad, theirs_grad)
    assert 3.0 < ours < 8.0  # a real contrastive loss at random init: near ln(2N - 1) = 6.2 for T = 0.2


# ---------------------------------------------------------------------------- MoCo v2
def test_moco_equals_lightly_ntxent_with_a_memory_bank():
    """VISSL's MoCo loss (the query against its key and the queue) is lightly's NT-Xent
    with a memory bank holding the same queue; after each step both queues hold the
    step's keys at the same place. One step more than the queue holds batches: the
    pointer wraps around."""
    config, vissl_loss = _built(small("moco"), "moco_loss")
    block = config.LOSS.moco_loss
    batch, dim, size = config.DATA.TRAIN.BATCHSIZE_PER_REPLICA, block.embedding_dim, block.queue_size
    lightly_loss = NTXentLoss(temperature=block.temperature, memory_bank_size=(size, dim))
    lightly_loss.memory_bank.bank = vissl_loss.queue.T.clone()  # (K, C): lightly's layout; VISSL's is (C, K)
    lightly_loss.memory_bank.bank_ptr.zero_()
    keys = []
    for step in range(size // batch + 1):
        query = _leaf(batch, dim, seed=2 * step)
        key = F.normalize(torch.randn(batch, dim, generator=torch.Generator().manual_seed(2 * step + 1)), dim=1)
        keys.append(key)
        vissl_loss.key = key  # what VISSL's MoCoHook puts there: the key encoder's normalised output
        ours, ours_grad = _value_and_grad(lambda q: vissl_loss(q, None), query)
        theirs, theirs_grad = _value_and_grad(lambda q: lightly_loss(q, key), query)  # noqa: B023  (called here)
        _assert_close(ours, theirs)
        _assert_close(ours_grad, theirs_grad)
        _assert_close(vissl_loss.queue, lightly_loss.memory_bank.bank.T)
        assert int(vissl_loss.queue_ptr) == int(lightly_loss.memory_bank.bank_ptr) == (step + 1) * batch % size
    # Where: the last step's keys at the front (the pointer wrapped), the step before's at the end.
    assert torch.equal(vissl_loss.queue[:, :batch], keys[-1].T)
    assert torch.equal(vissl_loss.queue[:, -batch:], keys[-2].T)


# ---------------------------------------------------------------------------- SwAV
SWAV_CONFIGS = {"small-scale": small("swav"), "ImageNet recipe": "pretrain/swav/swav_convit_small_in1k_224_300ep"}


def _swav_inputs(config: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(embeddings of every crop, normalised prototypes, images per crop, global crops):
    VISSL's swav_head scores are the cosines of the two (no bias)."""
    block = config.LOSS.swav_loss
    (multicrop,) = [t for t in config.DATA.TRAIN.TRANSFORMS if t["name"] == "ImgPilToMultiCrop"]
    batch = config.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    generator = torch.Generator().manual_seed(seed + 1)
    prototypes = F.normalize(torch.randn(block.num_prototypes[0], block.embedding_dim, generator=generator), dim=1)
    return _leaf(block.num_crops * batch, block.embedding_dim, seed=seed), prototypes, batch, multicrop["num_crops"][0]


def _swav_run(config: Any, vissl_loss: Any, hard: bool) -> None:
    """VISSL's loss and the codes of its distributed Sinkhorn-Knopp against lightly's
    SwaVLoss and `sinkhorn` (made one-hot where VISSL's assignments are hard)."""
    import lightly.loss.swav_loss as lightly_module
    import vissl.losses.swav_loss as vissl_module

    block = config.LOSS.swav_loss
    embeddings, prototypes, batch, global_crops = _swav_inputs(config, seed=0)
    codes: list[torch.Tensor] = []
    upstream = vissl_module.distributed_sinkhornknopp

    def recording(**kwargs: Any) -> torch.Tensor:
        q = upstream(**kwargs)
        codes.append(q[:batch].clone())
        return q

    def lightly_codes(scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        q = sinkhorn(scores, **kwargs)
        return F.one_hot(q.argmax(1), q.shape[1]).to(q.dtype) if hard else q

    vissl_module.distributed_sinkhornknopp, lightly_module.sinkhorn = recording, lightly_codes
    try:
        ours, ours_grad = _value_and_grad(
            lambda e: vissl_loss([e, F.normalize(e, dim=1) @ prototypes.T], None), embeddings
        )
        lightly_loss = SwaVLoss(
            temperature=block.temperature, sinkhorn_iterations=block.num_iters, sinkhorn_epsilon=block.epsilon
        )

        def theirs_fn(e: torch.Tensor) -> torch.Tensor:
            crops = (F.normalize(e, dim=1) @ prototypes.T).split(batch)
            return lightly_loss(list(crops[:global_crops]), list(crops[global_crops:]))

        theirs, theirs_grad = _value_and_grad(theirs_fn, embeddings)
    finally:
        vissl_module.distributed_sinkhornknopp, lightly_module.sinkhorn = upstream, sinkhorn
    _assert_close(ours, theirs)
    _assert_close(ours_grad, theirs_grad)

    scores = (F.normalize(embeddings, dim=1) @ prototypes.T).detach()
    assert len(codes) == len(block.crops_for_assign) == global_crops == 2
    for code, crop in zip(codes, block.crops_for_assign):
        expected = lightly_codes(
            scores[crop * batch : (crop + 1) * batch], iterations=block.num_iters, epsilon=block.epsilon
        )
        _assert_close(code, expected)
        _assert_close(code.sum(dim=1), torch.ones(batch))  # one code per image
        assert code.argmax(dim=1).unique().numel() > batch // 4  # spread over the prototypes, not collapsed


@pytest.mark.parametrize("name", sorted(SWAV_CONFIGS))
def test_swav_equals_lightly_swav_loss_and_sinkhorn_codes(name):
    """VISSL's SwAV loss (the small config's 2 x 32 px crops of 64 images and 64
    prototypes; the ImageNet recipe's 2 x 224 + 6 x 96 px crops of 32 images and 3000)
    on bias-free prototype scores is lightly's SwaVLoss, and the codes VISSL's
    distributed Sinkhorn-Knopp gives each assignment crop are lightly's `sinkhorn`'s."""
    config, vissl_loss = _built(SWAV_CONFIGS[name], "swav_loss")
    assert config.LOSS.swav_loss.queue.local_queue_length == 0
    vissl_loss.swav_criterion.num_iteration.fill_(config.LOSS.swav_loss.temp_hard_assignment_iters)  # soft codes
    _swav_run(config, vissl_loss, hard=False)


def test_swav_first_epoch_codes_are_lightlys_made_hard():
    """The small config's first epoch (temp_hard_assignment_iters): VISSL's codes are
    lightly's Sinkhorn codes made one-hot at their largest entry, and its loss is
    lightly's SwaVLoss with those codes."""
    config, vissl_loss = _built(small("swav"), "swav_loss")
    assert int(vissl_loss.swav_criterion.num_iteration) == 0 < config.LOSS.swav_loss.temp_hard_assignment_iters
    _swav_run(config, vissl_loss, hard=True)


# ---------------------------------------------------------------------------- DINO
def test_dino_equals_lightly_dino_loss_and_centre():
    """VISSL's DINO loss at the small config's teacher temperature (set by VISSL's DINOHook
    from its schedule; given here explicitly) is lightly's DINOLoss; the centre both keep
    (EMA 0.9 of the teacher's batch mean) is equal after each of three steps."""
    config, vissl_loss = _built(small("dino"), "dino_loss")
    block = config.LOSS.dino_loss
    batch, dim, crops = config.DATA.TRAIN.BATCHSIZE_PER_REPLICA, block.output_dim, block.num_crops
    teacher_temp = block.teacher_temp_min
    lightly_loss = DINOLoss(
        output_dim=dim, teacher_temp=teacher_temp, student_temp=block.student_temp, center_momentum=block.ema_center
    )
    for step in range(3):
        teacher = torch.randn(crops * batch, dim, generator=torch.Generator().manual_seed(100 + step)) * 2 + 0.5
        student = _leaf(crops * batch, dim, seed=step, scale=2.0)
        vissl_loss.teacher_output, vissl_loss.teacher_temp = teacher, teacher_temp  # what DINOHook sets
        ours, ours_grad = _value_and_grad(lambda s: vissl_loss([s]), student)
        theirs, theirs_grad = _value_and_grad(
            lambda s: lightly_loss(list(teacher.chunk(crops)), list(s.chunk(crops)), teacher_temp=teacher_temp),  # noqa: B023
            student,
        )
        _assert_close(ours, theirs)
        _assert_close(ours_grad, theirs_grad)
        _assert_close(vissl_loss.center, lightly_loss.center.reshape(1, dim))
    assert vissl_loss.center.abs().max() > 0.1  # the centre moved towards the teacher's mean (0.5)


# ---------------------------------------------------------------------------- Barlow Twins
def _standardised(z: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode (the official code, lightly), in float64."""
    z = z.double()
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)


def _barlow_twins(za: torch.Tensor, zb: torch.Tensor, lambda_: float, joint: bool) -> torch.Tensor:
    """The Barlow Twins objective in float64, with each view standardised on its own
    (the paper, the official code, lightly) or both views together (VISSL)."""
    if joint:
        both = _standardised(torch.cat([za, zb]))
        za, zb = both.split(len(za))
    else:
        za, zb = _standardised(za), _standardised(zb)
    c = za.T @ zb / len(za)
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambda_ * off


def test_barlow_twins_standardises_both_views_together():
    """VISSL's Barlow Twins (vissl/losses/barlow_twins_loss.py:118-130) standardises the
    2N embeddings of both views with one mean and variance per dimension
    (SyncNormalizeFunction over the whole batch) and multiplies by `scale_loss`;
    the paper, the official code and lightly standardise each view separately.

    1. When the two views have the same per-dimension statistics (the second view a
       permutation of the first), the two standardisations coincide: VISSL's loss is
       `scale_loss` x lightly's. Their gradients still differ (0.2 % of the largest),
       since the joint statistics depend on both views: each equals its own objective
       (float64 references below; VISSL's through its hand-written
       SyncNormalizeFunction.backward).
    2. In general VISSL computes the joint-standardised objective, and an offset between
       the views' means is not removed: it counts against the diagonal (here 2.1x
       lightly's loss, gradient cosine 0.78). Two views of one distribution differ by
       sampling noise only (measured: +1.7 % loss, gradient cosine 0.994)."""
    config, vissl_loss = _built(small("barlow_twins"), "barlow_twins_loss")
    block = config.LOSS.barlow_twins_loss
    n, dim = config.DATA.TRAIN.BATCHSIZE_PER_REPLICA, block.embedding_dim
    lightly_loss = BarlowTwinsLoss(lambda_param=block.lambda_)

    def check(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(VISSL's loss, scale_loss x lightly's), each checked against its float64 objective."""
        ours, ours_grad = _value_and_grad(lambda x: vissl_loss(x, None), views)
        theirs, theirs_grad = _value_and_grad(lambda x: block.scale_loss * lightly_loss(*x.split(n)), views)
        for value, grad, joint in ((ours, ours_grad, True), (theirs, theirs_grad, False)):
            reference, reference_grad = _value_and_grad(
                lambda x: block.scale_loss * _barlow_twins(*x.double().split(n), block.lambda_, joint=joint),  # noqa: B023
                views,
            )
            _assert_close(value.double(), reference, rtol=1e-5, atol=0)
            _assert_close(grad, reference_grad, rtol=1e-4, atol=1e-4 * reference_grad.abs().max().item())
        return ours, theirs

    za = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    permuted = torch.cat([za, za[torch.randperm(n, generator=torch.Generator().manual_seed(1))]])
    ours, theirs = check(permuted)
    _assert_close(ours, theirs)

    # Two correlated views as a projector gives them, the second shifted and rescaled.
    zb = 0.8 * za + 0.6 * torch.randn(n, dim, generator=torch.Generator().manual_seed(2))
    ours, theirs = check(torch.cat([za, 1.5 * zb + 0.5]))
    assert ours > 2 * theirs


# ---------------------------------------------------------------------------- DeepCluster-v2
def _official_kmeans(bank: torch.Tensor, centroids: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means as main_deepclusterv2.py:cluster_memory runs it on one process:
    `iterations` rounds of (assign each embedding to its most similar centroid; move
    every centroid that got members to their mean; normalise all), then a last assignment.
    Written with dense one-hot sums in float64, not VISSL's sparse index lists."""
    bank, centroids = bank.double(), centroids.double()
    for _ in range(iterations):
        members = F.one_hot((bank @ centroids.T).argmax(1), len(centroids)).double()
        counts = members.sum(0)
        means = members.T @ bank / counts.clamp(min=1).unsqueeze(1)
        centroids = F.normalize(torch.where((counts > 0).unsqueeze(1), means, centroids), dim=1)
    return (bank @ centroids.T).argmax(1), centroids


def test_deepclusterv2_equals_the_official_algorithm():
    """VISSL's DeepCluster-v2 (with convit_ssl's device patch) on the small config's
    memory bank (2 crops x 1408 images x 128) and 30 / 60 / 100 clusters: the memory
    bank VISSL fills, the assignments and centroids of its k-means, and the loss and
    gradient of the next step equal the official algorithm's."""
    config, vissl_loss = _built(small("deepclusterv2"), "deepclusterv2_loss")
    block = config.LOSS.deepclusterv2_loss
    batch, crops, dim = block.BATCHSIZE_PER_REPLICA, block.num_crops, block.memory_params.embedding_dim
    size = vissl_loss.local_memory_embeddings.shape[1]
    assert size == block.num_train_samples // batch * batch  # DROP_LAST: whole batches

    # The memory bank: one pass over a shuffled "dataset" whose crops embed to fixed vectors,
    # around 100 centres (clear clusters: on structureless data VISSL's float32 and this float64
    # k-means part at near-ties, 2 of 1438 assignments measured with 80 clusters).
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(block.num_train_samples, generator=generator)[:size]
    embed = torch.randn(crops, block.num_train_samples, dim, generator=generator)
    embed += 2 * torch.randn(100, dim, generator=generator)[torch.arange(block.num_train_samples) % 100]  # 100 blobs
    loader = [
        {
            "data_idx": [idx.repeat(crops)],
            "data": [[torch.stack([torch.full_like(idx, c), idx], dim=1) for c in range(crops)]],
        }
        for idx in order.split(batch)
    ]

    def model(inputs: torch.Tensor) -> list[torch.Tensor]:  # (crop, image index) -> that crop's embedding
        return [embed[inputs[:, 0], inputs[:, 1]]]

    vissl_loss.init_memory(loader, model)
    bank = F.normalize(embed[:, order], dim=2)
    _assert_close(vissl_loss.local_memory_embeddings, bank)
    assert torch.equal(vissl_loss.local_memory_index, order)

    # k-means: rank 0 draws each clustering's initial centroids from its memory bank.
    torch.manual_seed(7)
    vissl_loss.cluster_memory()
    torch.manual_seed(7)
    for i, k in enumerate(block.num_clusters):
        j = i % len(block.memory_params.crops_for_mb)  # the banks take turns
        start = bank[j][torch.randperm(size)[:k]]
        assignments, centroids = _official_kmeans(bank[j], start, block.kmeans_iters)
        expected = torch.full((block.num_train_samples,), -100, dtype=torch.long)
        expected[order] = assignments
        assert torch.equal(vissl_loss.assignments[i], expected), f"{k} clusters"
        _assert_close(getattr(vissl_loss, f"centroids{i}").double(), centroids, rtol=1e-5, atol=1e-6)
        assert assignments.unique().numel() >= k // 3  # real clusters, not one

    # The next step: cross-entropy of every crop against its image's cluster, per clustering.
    idx = order[:batch].repeat(crops)
    output = _leaf(crops * batch, dim, seed=3)

    def official(out: torch.Tensor) -> torch.Tensor:
        scores = [
            F.normalize(out, dim=1) @ getattr(vissl_loss, f"centroids{i}").T / block.temperature
            for i in range(len(block.num_clusters))
        ]
        return sum(F.cross_entropy(s, vissl_loss.assignments[i][idx]) for i, s in enumerate(scores)) / len(scores)

    theirs, theirs_grad = _value_and_grad(official, output)
    ours, ours_grad = _value_and_grad(lambda out: vissl_loss(out, idx), output)
    _assert_close(ours, theirs)
    _assert_close(ours_grad, theirs_grad)
    # ... and the step's embeddings enter the memory bank, detached, where the pass starts.
    _assert_close(
        vissl_loss.local_memory_embeddings[:, :batch], F.normalize(output, dim=1).detach().view(crops, batch, dim)
    )
    assert not vissl_loss.local_memory_embeddings.requires_grad
