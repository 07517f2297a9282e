"""`convit-ssl demo` end to end (what `make demo` runs), shortened to one
supervised epoch's worth of images (for the data-efficiency pair too), one
SimCLR epoch, and two epochs' worth of images for the probes and the
fine-tune: the VISSL stages on the exported digits, their summary (read back
from the run folders), the analysis figures and the demo's own figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from convit_ssl.checkpoints import run_folder


@pytest.mark.slow
def test_demo_runs_all_stages_and_draws_the_analysis(tmp_path):
    from convit_ssl.experiments.demo import STAGES

    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "convit_ssl.cli",
            "demo",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--ssl-epochs",
            "1",
            "--probe-epochs",
            "2",
        ],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(STAGES) | {"knn", "efficiency", "probes", "figures"} == set(summary)
    # every accuracy in the summary is the last test record of its stage's metrics.json
    for stage in STAGES:
        if stage != "ssl":
            assert summary[stage]["test"] == run_folder.final_accuracies(out / stage)["test"], stage
    for probe in ("linear", "linear_ssl", "linear_random"):
        assert set(summary[probe]["test"]) == {"lastCLS", "concatCLS2"}, probe  # one probe per feature
    # the data-efficiency pair: ConViT and its DeiT twin on 25% of each class (random_per_class, seed 0),
    # trained for about as many iterations as the supervised run (1 epoch of 22 batches: 4 epochs of 5)
    eff = summary["efficiency"]
    assert (eff["fraction"], eff["images"], eff["of"], eff["epochs"]) == (0.25, 355, 1438, 4)
    for stage, gpsa in (("efficiency_convit", "NUM_GPSA_LAYERS: 4"), ("efficiency_deit", "NUM_GPSA_LAYERS: 0")):
        log = (out / stage / "log.txt").read_text()
        assert (
            "training on a random_per_class subset of 355 / 1438 images" in log
            and gpsa in (out / stage / "train_config.yaml").read_text()
        ), stage
        assert [r for r in run_folder.metrics(out / stage) if "test_accuracy_list_meter" in r][-1]["iteration"] == 20
    # the probes: 10% of the labels, as many images seen as 2 epochs of all of them
    assert summary["probes"] == {"fraction": 0.1, "images": 139, "epochs": 22}
    # kNN of the three trunks: the supervised run's first monitor record is the random init
    assert set(summary["knn"]) == {"random_init", "ssl", "supervised"}
    assert summary["ssl"]["knn_curve"][0] == [0, summary["knn"]["random_init"]]  # the same init, the same measure
    # one supervised epoch is mostly warm-up; the fine-tune must beat chance (10%) clearly
    assert summary["finetune"]["test"]["0"] > 25.0, summary
    records = [json.loads(line) for line in (out / "supervised" / "convit_analysis.jsonl").read_text().splitlines()]
    assert len(records) == 1 and len(records[0]["layers"]) == 6  # one epoch, 6 blocks
    for name in (
        "gating",
        "nonlocality",
        "attention_combined",
        "attention_positional",
        "training_curves",
        "data_efficiency",
        "ssl_knn",
    ):
        with Image.open(out / "analysis" / f"{name}.png") as image:
            assert min(image.size) > 100, name
    assert summary["figures"]["data_efficiency"] == str(out / "analysis" / "data_efficiency.png")
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    assert len(analysis["images"]) == 32 and analysis["training_log"]["records"] == 1
    assert "data efficiency: 25% of the training set (355 images)" in proc.stdout
    assert "data_efficiency.png" in proc.stdout and "ssl_knn.png" in proc.stdout


def test_stages_run_two_at_a_time_after_what_they_need(monkeypatch, tmp_path):
    """The demo's scheduler: list order, at most two at once, a stage only after
    the stages it needs; a failing stage raises."""
    import threading
    import time

    from convit_ssl.experiments import stages as demo

    events, lock, running = [], threading.Lock(), set()
    durations = {"long": 0.3, "short": 0.05, "after_short": 0.05, "after_long": 0.05}

    def fake_run(title, overrides, stage_dir, **kwargs):
        name = stage_dir.name
        assert kwargs["label"] == name and kwargs["threads"] >= 1
        with lock:
            running.add(name)
            events.append(("start", name, frozenset(running)))
        time.sleep(durations[name])
        with lock:
            running.discard(name)
            events.append(("end", name))
        if overrides == ["fail"]:
            raise RuntimeError(f"stage {name!r} failed")
        return durations[name]

    monkeypatch.setattr(demo, "run_stage", fake_run)
    stages = [
        demo.Stage("long", "", lambda: []),
        demo.Stage("short", "", lambda: []),
        demo.Stage("after_long", "", lambda: [], needs=("long",)),
        demo.Stage("after_short", "", lambda: [], needs=("short",)),
    ]
    times = demo.run_stages(stages, tmp_path)
    assert times == durations
    starts = [e for e in events if e[0] == "start"]
    assert [e[1] for e in starts] == ["long", "short", "after_short", "after_long"]
    assert max(len(e[2]) for e in starts) == 2
    order = [e[:2] for e in events]
    assert order.index(("end", "short")) < order.index(("start", "after_short"))
    assert order.index(("end", "long")) < order.index(("start", "after_long"))

    stages[2] = demo.Stage("after_long", "", lambda: ["fail"], needs=("long",))
    with pytest.raises(RuntimeError, match="stage 'after_long' failed"):
        demo.run_stages(stages, tmp_path)
