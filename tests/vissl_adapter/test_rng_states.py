"""The ranks' random-number states that checkpoints carry (convit_ssl.vissl.compat.rng):
what is saved sets every generator back, survives a `weights_only` load, and a
checkpoint that cannot be used (none saved, another world size) says so."""

import logging
import random
import types

import numpy as np
import torch

from convit_ssl.vissl.compat import rng


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_saved_states_set_every_generator_back_after_a_weights_only_load(tmp_path):
    task = types.SimpleNamespace(device=torch.device("cpu"))
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    torch.save({"rng_states": [rng.rank_state(task.device)]}, tmp_path / "state.torch")
    expected = [_draws() for _ in range(3)]

    _draws()  # elsewhere in the streams
    state = torch.load(tmp_path / "state.torch", weights_only=True)["rng_states"][0]
    rng.set_rank_state(state, task.device)
    assert [_draws() for _ in range(3)] == expected


def test_carried_only_while_saving():
    task = types.SimpleNamespace(device=torch.device("cpu"))
    with rng.carried(task, saving=False):
        assert rng.KEY not in rng.add_to_state(task, {})
    with rng.carried(task):
        assert len(rng.add_to_state(task, {})[rng.KEY]) == 1
    assert rng.KEY not in rng.add_to_state(task, {})  # nothing left for a later checkpoint


def test_unusable_states_are_reported_and_not_set(caplog):
    task = types.SimpleNamespace(device=torch.device("cpu"))
    state = rng.rank_state(task.device)
    with caplog.at_level(logging.WARNING):
        rng.keep_for_resume(task, {})
        rng.keep_for_resume(task, {rng.KEY: [state, state]})  # 2 ranks saved, 1 resumes
    assert not hasattr(task, rng._PENDING)
    assert "carries no random-number states" in caplog.records[0].message
    assert "of 2 ranks, the resumed run has 1" in caplog.records[1].message


def test_restored_at_the_point_the_checkpoint_was_written():
    """A phase checkpoint's states are set before the next phase's iterator is made,
    an iteration checkpoint's once the interrupted phase's iterator is remade."""
    for start_iter, restored_before in ((0, True), (3, False)):
        task = types.SimpleNamespace(
            device=torch.device("cpu"), _compute_start_iter_from_checkpoint=lambda _, n=start_iter: n
        )
        torch.manual_seed(0)
        rng.keep_for_resume(task, {rng.KEY: [rng.rank_state(task.device)]})
        expected = float(torch.rand(1))
        rng.restore(task, mid_phase=False)
        assert (float(torch.rand(1)) == expected) == restored_before
        rng.restore(task, mid_phase=True)
        assert not hasattr(task, rng._PENDING)
