"""The data-efficiency comparison (tools/data_efficiency.py,
convit_ssl/experiments/data_efficiency.py): the schedule gives every fraction
the same number of iterations over the subset the sampler really draws; the
verdict is stated only where the seeds separate; and the tool's quick mode
trains ConViT and its DeiT twin through VISSL on two fractions, its results
read back from the run folders."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from convit_ssl.checkpoints import run_folder
from convit_ssl.data.subsets import subset_indices
from convit_ssl.experiments import data_efficiency as de
from helpers import REPO

DIGITS_CLASSES = [142, 146, 142, 146, 145, 146, 145, 143, 139, 144]  # the digits' training split


@pytest.mark.parametrize("fraction", de.FRACTIONS)
def test_every_fraction_trains_for_the_iterations_of_the_whole_set(fraction):
    plan = de.schedule(DIGITS_CLASSES, fraction, batch_size=64, base_epochs=15)
    labels = np.repeat(np.arange(10), DIGITS_CLASSES)
    drawn = subset_indices(labels, fraction, "random_per_class", seed=3)
    assert plan.images == len(drawn)  # what ConViTSampler will iterate over
    assert plan.iterations_per_epoch == len(drawn) // 64
    assert plan.iterations == 15 * (1438 // 64) == 330  # 5 %: 330 epochs of 1 batch; 100 %: 15 of 22
    assert plan.epochs // plan.test_every in (15, 16)  # tested about as often in every run


def test_a_fraction_below_one_batch_is_refused():
    with pytest.raises(ValueError, match=r"fraction 0.01 keeps 10 of 1438 training images, less than one batch of 64"):
        de.schedule(DIGITS_CLASSES, 0.01, 64, 15)


def _run(arch, fraction, seed, top1):
    return {"arch": arch, "fraction": fraction, "seed": seed, "images": int(1438 * fraction), "top1": top1}


def test_verdict_only_where_the_seeds_separate():
    runs = [_run("convit", 0.1, s, t) for s, t in enumerate([90.5, 91.0, 89.9])]
    runs += [_run("deit", 0.1, s, t) for s, t in enumerate([87.5, 88.0, 89.0])]
    runs += [_run("convit", 1.0, s, t) for s, t in enumerate([94.0, 95.0, 94.5])]
    runs += [_run("deit", 1.0, s, t) for s, t in enumerate([94.2, 93.0, 95.1])]
    rows = de.summarize(runs)
    assert [r["fraction"] for r in rows] == [0.1, 1.0]
    assert rows[0]["verdict"] == "ConViT higher on every seed" and rows[0]["gap"] == pytest.approx(2.3)
    assert rows[0]["convit"]["top1"] == {"mean": 90.47, "std": 0.55, "min": 89.9, "max": 91.0}
    assert rows[1]["verdict"] == "the seeds overlap: none"
    assert de.verdict([80.0, 81.0], [82.0, 83.0]) == "DeiT higher on every seed"
    assert de.verdict([80.0], [70.0]) == "one seed: no verdict"
    table = de.markdown_table({"runs": runs})
    assert rows[1]["per_seed_gap"] == {0: -0.2, 1: 2.0, 2: -0.6}
    assert (
        "| 10% | 143 | **90.5** (89.9 .. 91.0) | **88.2** (87.5 .. 89.0) | +2.3 | +3.0, +3.0, +0.9 "
        "| ConViT higher on every seed |"
    ) in table


@pytest.mark.slow
def test_quick_mode_trains_both_architectures_on_two_fractions(digits, tmp_path):
    out = tmp_path / "efficiency"
    command = [
        sys.executable,
        str(REPO / "tools" / "data_efficiency.py"),
        "--out",
        str(out),
        "--data",
        str(digits),
        "--quick",
    ]
    proc = subprocess.run(
        command, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert {(r["arch"], r["fraction"], r["seed"]) for r in results["runs"]} == {
        (a, f, 0) for a in ("convit", "deit") for f in (0.25, 1.0)
    }
    for run in results["runs"]:
        folder = out / de.run_name(run["arch"], run["fraction"], run["seed"])
        tests = [r for r in run_folder.metrics(folder) if "test_accuracy_list_meter" in r]
        # the reported top-1 is the run's last test, after its last iteration: about one epoch of
        # the whole set in batches of 16 (89), whatever the fraction (25 %: 4 epochs of 22)
        assert run["top1"] == round(run_folder.final_accuracies(folder)["test"]["0"], 2)
        assert tests[-1]["iteration"] == run["iterations"] == {0.25: 4 * 22, 1.0: 89}[run["fraction"]]
        assert run["images_seen"] == run["iterations"] * 16
        log = (folder / "log.txt").read_text()
        if run["fraction"] < 1:
            assert f"training on a random_per_class subset of {run['images']} / 1438 images" in log
        config = (folder / "train_config.yaml").read_text()
        assert ("NUM_GPSA_LAYERS: 0" in config) == (run["arch"] == "deit")
    assert [row["fraction"] for row in results["summary"]] == [0.25, 1.0]
    assert results["summary"][0]["images"] == 355
    with Image.open(out / "data_efficiency.png") as image:
        assert min(image.size) > 300
    # finished runs are skipped: a second call trains nothing and changes nothing
    again = subprocess.run(
        command, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120
    )
    assert again.returncode == 0 and "convit-ssl run" not in again.stdout
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    table = subprocess.run([*command[:4], "--table"], text=True, capture_output=True, check=True).stdout
    assert table.splitlines()[2].startswith("| 25% | 355 |")


def test_the_docs_show_the_measured_table():
    """The table in the README and docs/DATA_EFFICIENCY.md is the one the shipped results give."""
    results = json.loads((REPO / "docs" / "benchmarks" / "data_efficiency_digits.json").read_text())
    assert len(results["runs"]) == 30 and {r["images_seen"] for r in results["runs"]} == {21120}
    table = de.markdown_table(results)
    for doc in ("README.md", "docs/DATA_EFFICIENCY.md"):
        assert table in (REPO / doc).read_text(), doc
