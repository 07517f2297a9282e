"""tools/linear_probe.py: converged logistic-regression probes of frozen trunks on
named features, on a class-balanced fraction of the labels."""

from __future__ import annotations

import subprocess
import sys

import torch

from convit_ssl import create_model
from helpers import REPO


def test_probes_read_more_with_more_labels_and_beat_chance(digits, tmp_path):
    torch.manual_seed(0)
    model = create_model("convit_tiny", img_size=32, patch_size=4, width=48, depth=2, num_gpsa_layers=1, num_classes=0)
    checkpoint = tmp_path / "random_trunk.pth"
    torch.save(model.state_dict(), checkpoint)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "linear_probe.py"),
            str(checkpoint),
            "--data",
            str(digits),
            "--features",
            "lastCLS",
            "concatPOOL2",
            "--fractions",
            "0.05",
            "1",
            "--seeds",
            "0",
            "1",
        ],
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith(f"| {checkpoint}")]
    assert [row[1].strip() for row in rows] == ["lastCLS", "concatPOOL2"]
    for _, feature, few, every in rows:
        few, every = float(few), float(every)
        # a random 2-block trunk's features, read linearly: far above chance (10 %) with 1438 labels,
        # and lower from 5 % of them (69 images)
        assert every > 60.0 and 10.0 < few < every, (feature, few, every)
