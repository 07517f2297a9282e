"""The benchmark scripts run and report every row (on a tiny model: the figures
themselves are measured by hand, never asserted in a test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO


def _run(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / script), *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=600,
        check=True,
    )


@pytest.mark.slow
def test_benchmark_reports_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(
        "benchmark.py",
        "--arch",
        "convit_tiny",
        "--batch",
        "2",
        "--size",
        "32",
        "--mem-size",
        "64",
        "--mem-batch",
        "2",
        "--modes",
        "fp32",
        "bf16",
        "--rounds",
        "1",
        "--iters",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    result = json.loads(out.read_text())["results"]["convit_tiny"]
    for mode in ("fp32", "bf16"):
        assert set(result["speed"][mode]) == {"ours", "timm_convit", "timm_vit"}
        assert all(v > 0 for peer in result["speed"][mode].values() for v in peer.values())
        assert set(result["ratios"][mode]) == {
            "forward_vs_timm_vit",
            "forward_vs_timm_convit",
            "train_vs_timm_vit",
            "train_vs_timm_convit",
        }
    memory = result["memory_mb"]
    assert memory["ours"] > 1 and memory["timm_convit"] > 1 and memory["ours_ckpt"] > 0
    assert "target >= 0.90x" in proc.stdout and "train_memory_vs_timm_convit" in proc.stdout


def test_vissl_overhead_benchmark_runs(tmp_path):
    out = tmp_path / "vissl.json"
    proc = _run(
        "benchmark_vissl.py",
        "--size",
        "32",
        "--batch",
        "4",
        "--iters",
        "5",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    result = json.loads(out.read_text())
    assert result["plain_s_per_iter"] > 0 and result["vissl_s_per_iter"] > 0
    assert "VISSL overhead" in proc.stdout


def test_data_loader_benchmark_reports_every_row(tmp_path):
    out = tmp_path / "loaders.json"
    proc = _run(
        "benchmark_data.py",
        "--rounds",
        "1",
        "--images",
        "1",
        "--recipes",
        "simclr",
        "supervised (DeiT recipe)",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"photographs 427x640", "ImageNet-size 500x375"}
    for rows in results.values():
        assert [row["recipe"] for row in rows] == ["simclr", "supervised (DeiT recipe)"]
        for row in rows:
            assert row["ratio"] > 0 and row["decode_ms"] > 0 and row["device_ms_this_cpu"] > 0
            assert row["vissl_bytes"] == 4 * row["ours_bytes"]  # float32 crops against uint8 crops
    assert "cores for 1,000 img/s" in proc.stdout
