"""convit_ssl.checkpoints.run_folder: a VISSL run folder read by phase number and as numbers."""

from __future__ import annotations

import json

import pytest

from convit_ssl.checkpoints import run_folder


def test_final_checkpoint_is_the_highest_phase_not_the_last_name(tmp_path):
    for phase in (9, 14, 2):
        (tmp_path / f"model_final_checkpoint_phase{phase}.torch").write_bytes(b"")
    (tmp_path / "model_phase20.torch").write_bytes(b"")  # a phase checkpoint, not a final one
    assert run_folder.final_checkpoint(tmp_path).name == "model_final_checkpoint_phase14.torch"
    assert run_folder.phase_of(tmp_path / "model_phase20.torch") == 20


def test_a_run_without_a_final_checkpoint(tmp_path):
    assert run_folder.final_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match=r"no final checkpoint .* see .*log\.txt"):
        run_folder.require_final_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="not a VISSL phase checkpoint"):
        run_folder.phase_of(tmp_path / "checkpoint.torch")


def test_losses_and_accuracies_as_numbers(tmp_path):
    records = [{"iteration": 1, "loss": 2.5}, {"iteration": 2, "lr": 0.1}, {"iteration": 3, "loss": 1.25}]
    (tmp_path / "stdout.json").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert run_folder.losses(tmp_path) == [2.5, 1.25]
    metrics = [
        {"train_accuracy_list_meter": {"top_1": {"0": 50.0}}, "test_accuracy_list_meter": {"top_1": {"0": 40.0}}},
        {"train_accuracy_list_meter": {"top_1": {"0": 70.0}}},
        {"test_accuracy_list_meter": {"top_1": {"lastCLS": 61.5, "concatPOOL2": 64.0}}},
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in metrics))
    assert run_folder.final_accuracies(tmp_path) == {
        "train": {"0": 70.0},
        "test": {"lastCLS": 61.5, "concatPOOL2": 64.0},
    }
    assert run_folder.losses(tmp_path / "missing") == []


def test_a_line_cut_by_a_killed_writer_is_skipped_with_a_warning_by_every_reader(tmp_path, caplog):
    """metrics.json, stdout.json and the kNN monitor's records, their last line cut
    (no newline, not JSON): each reader returns the whole records before it."""
    from convit_ssl.vissl.hooks.knn import read_records

    whole = [{"iteration": 1, "loss": 2.5, "train_accuracy_list_meter": {"top_1": {"0": 40.0}}}]
    for name in (run_folder.METRICS, run_folder.STDOUT, run_folder.KNN_RECORDS):
        (tmp_path / name).write_text(json.dumps(whole[0]) + "\n" + '{"iteration": 2, "lo')
    with caplog.at_level("WARNING"):
        assert run_folder.metrics(tmp_path) == whole
        assert run_folder.losses(tmp_path) == [2.5]
        assert read_records(tmp_path) == whole
    assert caplog.text.count("skipped the incomplete last line 2") == 3


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / run_folder.METRICS).write_text('{"iteration": 1}\n{"iter\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.json, line 2: not valid JSON"):
        run_folder.metrics(tmp_path)
