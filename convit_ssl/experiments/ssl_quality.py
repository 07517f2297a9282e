"""Does each self-supervised method learn, at small scale? (`tools/ssl_quality.py`)

For each method (and architecture and seed) it runs, as real VISSL jobs on
the CPU, each in its own process:

1. pretraining with ``pretrain/<method>/<method>_convit_demo_digits_32`` (the
   ImageNet recipe with only what the small data forces restated) on the
   digits' train split, with the online kNN monitor (`convit_ssl.vissl.hooks.knn`) switched on:
   its record at iteration 0 is the kNN top-1 of the very same trunk at random
   init, its last record that of the pretrained trunk (and of the momentum
   teacher for DINO and MoCo), both measured the same way (DINO's kNN: cosine,
   k = 20, T = 0.07; train split as the memory bank, val split as queries, the
   class token ``lastCLS``);
2. the demo's linear stage (``demo/convit_ssl/digits_linear``: frozen trunk,
   one linear probe on ``lastCLS`` and one on ``concatPOOL2``) from the
   pretrained checkpoint, and the same stage on a trunk at random init of the
   same architecture and seed.

``--arch deit`` runs the DeiT baseline of identical dimensions
(``NUM_GPSA_LAYERS: 0``: the same 6 blocks, all plain self-attention).
``--override KEY=VALUE ...`` changes the pretraining runs (a narrower trunk
for a quick check, say; with ``--no-linear``, since the probes' configs
expect the default trunk).

Writes ``<out>/<method>/<arch>_seed<k>/{pretrain,linear}/`` (checkpoints and
logs), ``<out>/random_init/<arch>_seed<k>/linear/`` and ``<out>/results.json``
(one entry per run, and per method and architecture the mean and spread over
seeds). A run whose results are already in ``results.json`` is skipped, so an
interrupted sweep resumes.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from convit_ssl.checkpoints import run_folder
from convit_ssl.experiments.overrides import ARCHS, data_overrides, knn_overrides, train_overrides
from convit_ssl.experiments.seeds import spread
from convit_ssl.experiments.stages import run_stage
from convit_ssl.files import atomic_write_text
from convit_ssl.processes import Stopped
from convit_ssl.vissl.configs import num_epochs, small_scale_config
from convit_ssl.vissl.hooks.knn import read_records, record_frequency

TEACHERS = {"dino", "moco"}
LINEAR = "config=demo/convit_ssl/digits_linear"


def _linear(name: str, stage_dir: Path, data: list[str], arch: str, seed: int, weights: Path | None) -> dict:
    overrides = [LINEAR, *data, *ARCHS[arch], f"config.SEED_VALUE={seed}"]
    if weights is not None:
        overrides.append(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}")
    seconds = run_stage(name, overrides, stage_dir)
    return {"top1": run_folder.final_accuracies(stage_dir)["test"], "seconds": round(seconds, 1)}


def run_one(
    method: str,
    arch: str,
    seed: int,
    out: Path,
    train: Path,
    val: Path,
    random_linear: dict[str, dict],
    epochs: int | None = None,
    linear: bool = True,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Pretrain `method` with `arch` and `seed` (and Hydra `overrides` of the
    pretraining), then probe; returns the run's entry of results.json."""
    extra = list(overrides)
    run_dir = out / method / f"{arch}_seed{seed}"
    data = data_overrides(train, val)
    overrides = [
        f"config={small_scale_config(method)}",
        *train_overrides(train),
        *ARCHS[arch],
        f"config.SEED_VALUE={seed}",
    ]
    if epochs:
        overrides.append(f"config.OPTIMIZER.num_epochs={epochs}")
    overrides += extra
    run_epochs = num_epochs(overrides)
    overrides += knn_overrides(train, val, record_frequency(run_epochs), teacher=method in TEACHERS)
    seconds = run_stage(f"{method} / {arch} / seed {seed}: pretraining", overrides, run_dir / "pretrain")
    records = read_records(run_dir / "pretrain")
    if records[0]["iteration"] != 0 or records[-1]["epoch"] != run_epochs - 1:
        raise RuntimeError(
            f"{run_dir / 'pretrain'}: kNN records do not span the run: "
            f"{[(r['iteration'], r['epoch']) for r in records]}"
        )
    monitor = sum(r["seconds"] for r in records)
    key = f"{arch}_seed{seed}"
    probes: dict[str, Any] = {}
    if linear:
        if key not in random_linear:
            random_linear[key] = _linear(
                f"random-init {arch} / seed {seed}: linear probes",
                out / "random_init" / key / "linear",
                data,
                arch,
                seed,
                None,
            )
        pretrained = run_folder.require_final_checkpoint(run_dir / "pretrain")
        probes = {
            "random_init": random_linear[key]["top1"],
            "pretrained": _linear(
                f"{method} / {arch} / seed {seed}: linear probes", run_dir / "linear", data, arch, seed, pretrained
            )["top1"],
        }
    losses = run_folder.losses(run_dir / "pretrain")
    return {
        "method": method,
        "arch": arch,
        "seed": seed,
        "config": small_scale_config(method),
        "overrides": extra,
        "epochs": run_epochs,
        "iterations": records[-1]["iteration"],
        "pretrain_seconds": round(seconds - monitor, 1),
        "knn_monitor_seconds": round(monitor, 1),
        "final_loss": round(losses[-1], 4) if losses else None,
        "knn_top1": {
            "random_init": records[0]["student"]["top1"],
            "pretrained": records[-1]["student"]["top1"],
            **({"teacher": records[-1]["teacher"]["top1"]} if "teacher" in records[-1] else {}),
        },
        "knn_curve": [(r["epoch"] + 1, round(r["student"]["top1"], 2)) for r in records],
        "linear_top1": probes,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method and arch, over seeds: kNN top-1 random / pretrained / gain, linear lastCLS gain."""
    out: dict[str, Any] = {}
    for run in runs:
        out.setdefault(run["method"], {}).setdefault(run["arch"], []).append(run)
    summary: dict[str, Any] = {}
    for method, by_arch in out.items():
        for arch, group in by_arch.items():
            knn = [r["knn_top1"] for r in group]
            lin = [r["linear_top1"] for r in group if r["linear_top1"]]
            summary.setdefault(method, {})[arch] = {
                "seeds": sorted(r["seed"] for r in group),
                "knn_random_init": spread([k["random_init"] for k in knn]),
                "knn_pretrained": spread([k["pretrained"] for k in knn]),
                "knn_gain": spread([k["pretrained"] - k["random_init"] for k in knn]),
                **(
                    {
                        "linear_lastCLS_random_init": spread([x["random_init"]["lastCLS"] for x in lin]),
                        "linear_lastCLS_pretrained": spread([x["pretrained"]["lastCLS"] for x in lin]),
                    }
                    if lin
                    else {}
                ),
                "pretrain_seconds": spread([r["pretrain_seconds"] for r in group]),
            }
    return summary


NAMES = {
    "simclr": "SimCLR",
    "barlow_twins": "Barlow Twins",
    "moco": "MoCo v2",
    "swav": "SwAV",
    "deepclusterv2": "DeepCluster-v2",
    "dino": "DINO",
}


def markdown_tables(results: Mapping[str, Any]) -> str:
    """The tables of docs/SSL_SMALL_SCALE.md from a results.json: every run of seed 0 (kNN and
    linear probes, random init -> pretrained), then per method and architecture
    the kNN gain over seeds (mean +- std, min .. max)."""

    def probe(linear: Mapping[str, Any], feature: str) -> str:
        if not linear:
            return ""
        return f"{linear['random_init'][feature]:.1f} -> {linear['pretrained'][feature]:.1f}"

    lines = [
        "| method | arch | epochs (iterations) | pretraining | final loss | kNN top-1: random init -> pretrained "
        "| linear `lastCLS` | linear `concatPOOL2` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(
        (r for r in results["runs"] if r["seed"] == 0), key=lambda r: (list(NAMES).index(r["method"]), r["arch"])
    ):
        knn = run["knn_top1"]
        teacher = f" (teacher {knn['teacher']:.1f})" if "teacher" in knn else ""
        lines.append(
            f"| {NAMES[run['method']]} | {run['arch']} | {run['epochs']} ({run['iterations']}) | "
            f"{run['pretrain_seconds']:.0f} s | {run['final_loss']} | {knn['random_init']:.1f} -> "
            f"**{knn['pretrained']:.1f}** ({knn['pretrained'] - knn['random_init']:+.1f}){teacher} | "
            f"{probe(run['linear_top1'], 'lastCLS')} | {probe(run['linear_top1'], 'concatPOOL2')} |"
        )
    lines += [
        "",
        "| method | arch | seeds | kNN random init | kNN pretrained | gain: mean +- std (min .. max) |",
        "|---|---|---|---|---|---|",
    ]
    summary = summarize(list(results["runs"]))
    for method in (m for m in NAMES if m in summary):
        for arch, row in sorted(summary[method].items()):
            gain = row["knn_gain"]
            lines.append(
                f"| {NAMES[method]} | {arch} | {', '.join(map(str, row['seeds']))} | "
                f"{row['knn_random_init']['mean']:.1f} | {row['knn_pretrained']['mean']:.1f} | "
                f"{gain['mean']:+.1f} +- {gain['std']:.1f} ({gain['min']:+.1f} .. {gain['max']:+.1f}) |"
            )
    return "\n".join(lines)


def _write(path: Path, results: dict[str, Any]) -> None:
    results["summary"] = summarize(results["runs"])
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def sweep(
    out: Path,
    train: Path,
    val: Path,
    methods: Sequence[str],
    archs: Sequence[str],
    seeds: Sequence[int],
    epochs: int | None = None,
    linear: bool = True,
    overrides: Sequence[str] = (),
    header: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every (method, arch, seed) not yet in ``out/results.json``, one after
    another, writing the results after each (with `header`'s keys: command, date).
    A stop signal saves the results so far and raises `Stopped`."""
    path = out / "results.json"
    results = (
        json.loads(path.read_text())
        if path.is_file()
        else {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "data": {"train": str(train), "val": str(val)},
            "runs": [],
            "random_init_linear": {},
        }
    )
    results.update(header or {})
    done = {(r["method"], r["arch"], r["seed"]) for r in results["runs"]}
    for method in methods:
        for arch in archs:
            for seed in seeds:
                if (method, arch, seed) in done:
                    print(f"== {method} / {arch} / seed {seed}: in {path} already, skipped")
                    continue
                try:
                    run = run_one(
                        method,
                        arch,
                        seed,
                        out,
                        train,
                        val,
                        results["random_init_linear"],
                        epochs,
                        linear=linear,
                        overrides=overrides,
                    )
                except Stopped:
                    _write(path, results)
                    raise
                results["runs"].append(run)
                _write(path, results)
                knn, probes = run["knn_top1"], run["linear_top1"]
                linear_line = (
                    f"; linear lastCLS {probes['random_init']['lastCLS']:.1f}% -> {probes['pretrained']['lastCLS']:.1f}%"
                    if probes
                    else ""
                )
                print(
                    f"== {method} / {arch} / seed {seed}: kNN top-1 {knn['random_init']:.1f}% -> "
                    f"{knn['pretrained']:.1f}% ({run['pretrain_seconds']:.0f} s){linear_line}",
                    flush=True,
                )
    _write(path, results)
    return results
