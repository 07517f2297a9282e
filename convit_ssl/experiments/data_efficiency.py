"""The paper's data-efficiency comparison (its Table 2) at small scale: supervised
ConViT against the DeiT of identical dimensions on class-balanced fractions of
the training set, through the shipped feature (`DATA.TRAIN.SUBSET`,
`random_per_class`, one subset per seed) and VISSL's own training loop.

As in the paper, every run sees the same number of training images: a run on
a fraction f trains for about 1 / f times the config's epochs (exactly:
the full set's iterations per epoch over the subset's, VISSL dropping the
last partial batch), so the learning-rate schedule spans the same number of
steps. The model is tested on the whole validation split about as often in
every run (every `test_every` epochs, and after the last).

Each run is a `convit-ssl run` child process (`stages.run_stages`, two at a
time) writing into ``<out>/<arch>/f<fraction>_seed<seed>/``; its entry in
``<out>/results.json`` is read back from its run folder (the final top-1 and
the test curve of metrics.json) as soon as it finishes, so an interrupted
sweep resumes where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from convit_ssl.checkpoints import run_folder
from convit_ssl.experiments.overrides import ARCHS, arch_overrides, data_overrides
from convit_ssl.experiments.seeds import spread
from convit_ssl.experiments.stages import Stage, run_stages
from convit_ssl.files import atomic_write_text, is_image
from convit_ssl.vissl.configs import compose

CONFIG = "demo/convit_ssl/digits_supervised"
FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
SEEDS = (0, 1, 2)
NAMES = {"convit": "ConViT", "deit": "DeiT"}
# --quick: the demo's recipe on a 2-block, 32-wide trunk, small batches, one epoch's worth of images
QUICK_OVERRIDES = [
    "config.MODEL.TRUNK.CONVIT_SSL.WIDTH=32",
    "config.MODEL.TRUNK.CONVIT_SSL.DEPTH=2",
    "config.MODEL.TRUNK.CONVIT_SSL.NUM_GPSA_LAYERS=1",
    "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[32,10]}]]",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
    "config.OPTIMIZER.num_epochs=1",
]


@dataclass(frozen=True)
class Schedule:
    """How long a run on `fraction` of the training set trains."""

    fraction: float
    images: int  # in the subset
    iterations_per_epoch: int
    epochs: int
    test_every: int  # epochs between tests on the validation split

    @property
    def iterations(self) -> int:
        return self.iterations_per_epoch * self.epochs


def schedule(class_sizes: Sequence[int], fraction: float, batch_size: int, base_epochs: int) -> Schedule:
    """The epochs on `fraction` of a training set with `class_sizes` images per
    class that give the iterations of `base_epochs` on all of it (VISSL drops the
    last partial batch of an epoch). Raises if the subset holds less than one batch."""
    full = sum(class_sizes) // batch_size
    images = sum(int(n * fraction) for n in class_sizes)  # as subsets.subset_indices keeps them
    per_epoch = images // batch_size
    if full == 0 or per_epoch == 0:
        raise ValueError(
            f"fraction {fraction} keeps {images} of {sum(class_sizes)} training images, less than one "
            f"batch of {batch_size}: use a larger fraction or a smaller BATCHSIZE_PER_REPLICA"
        )
    epochs = max(1, round(base_epochs * full / per_epoch))
    return Schedule(fraction, images, per_epoch, epochs, max(1, epochs // base_epochs))


def class_sizes(train: Path) -> list[int]:
    """Images per class of an image folder (one sub-folder per class), in class order."""
    folders = sorted(p for p in Path(train).iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{train}: expected one sub-folder of images per class, found none")
    return [sum(1 for f in folder.rglob("*") if is_image(f.name)) for folder in folders]


def run_name(arch: str, fraction: float, seed: int) -> str:
    return f"{arch}/f{fraction:g}_seed{seed}"


def run_overrides(
    arch: str, fraction: float, seed: int, plan: Schedule, train: Path, val: Path, extra: Sequence[str] = ()
) -> list[str]:
    """The `convit-ssl run` overrides of one run: the demo's supervised config on
    the image folders, the subset of `seed`, its schedule, the architecture."""
    subset = (
        []
        if fraction >= 1.0
        else [
            f"+config.DATA.TRAIN.SUBSET.FRACTION={fraction}",
            "+config.DATA.TRAIN.SUBSET.MODE=random_per_class",
            f"+config.DATA.TRAIN.SUBSET.SEED={seed}",
        ]
    )
    return [
        f"config={CONFIG}",
        *data_overrides(train, val),
        "config.TRAINER.TASK_NAME=convit_ssl_task",
        f"config.SEED_VALUE={seed}",
        *subset,
        *extra,
        *arch_overrides(arch),
        f"config.OPTIMIZER.num_epochs={plan.epochs}",
        f"config.TEST_EVERY_NUM_EPOCH={plan.test_every}",
        f"config.CHECKPOINT.CHECKPOINT_FREQUENCY={plan.test_every * 5}",
        "config.HOOKS.CONVIT_ANALYSIS.USE=False",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=False",
    ]


def read_run(folder: Path, arch: str, seed: int, plan: Schedule, batch_size: int, seconds: float) -> dict[str, Any]:
    """A finished run's entry of results.json, from its run folder."""
    tests = [
        (r["iteration"], r["test_accuracy_list_meter"]["top_1"])
        for r in run_folder.metrics(folder)
        if "test_accuracy_list_meter" in r
    ]
    if not tests or tests[-1][0] != plan.iterations:
        raise RuntimeError(
            f"{folder}: the last test is not at iteration {plan.iterations}: "
            f"{[t[0] for t in tests]}; see {folder / run_folder.LOG}"
        )
    return {
        "arch": arch,
        "fraction": plan.fraction,
        "seed": seed,
        "images": plan.images,
        "epochs": plan.epochs,
        "iterations": plan.iterations,
        "images_seen": plan.iterations * batch_size,
        "top1": round(float(next(iter(tests[-1][1].values()))), 2),
        "curve": [(it * batch_size, round(float(next(iter(top1.values()))), 2)) for it, top1 in tests],
        "seconds": round(seconds, 1),
    }


def verdict(convit: Sequence[float], deit: Sequence[float]) -> str:
    """Stated only where the seeds separate: every ConViT seed above every DeiT seed, or the reverse."""
    if len(convit) < 2 or len(deit) < 2:
        return "one seed: no verdict"
    if min(convit) > max(deit):
        return "ConViT higher on every seed"
    if min(deit) > max(convit):
        return "DeiT higher on every seed"
    return "the seeds overlap: none"


def summarize(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per fraction: images, per architecture the top-1 over seeds, the gap of the means, the
    verdict, and the per-seed differences (a seed is one subset and one init for both architectures)."""
    by: dict[float, dict[str, list[Mapping[str, Any]]]] = {}
    for run in runs:
        by.setdefault(run["fraction"], {}).setdefault(run["arch"], []).append(run)
    rows = []
    for fraction in sorted(by):
        row: dict[str, Any] = {"fraction": fraction, "images": next(iter(by[fraction].values()))[0]["images"]}
        for arch, group in sorted(by[fraction].items()):
            row[arch] = {"seeds": sorted(r["seed"] for r in group), "top1": spread([r["top1"] for r in group])}
        if "convit" in row and "deit" in row:
            top1 = {arch: {r["seed"]: r["top1"] for r in by[fraction][arch]} for arch in ("convit", "deit")}
            row["gap"] = round(row["convit"]["top1"]["mean"] - row["deit"]["top1"]["mean"], 2)
            row["verdict"] = verdict(list(top1["convit"].values()), list(top1["deit"].values()))
            row["per_seed_gap"] = {
                seed: round(top1["convit"][seed] - top1["deit"][seed], 2)
                for seed in sorted(set(top1["convit"]) & set(top1["deit"]))
            }
        rows.append(row)
    return rows


def markdown_table(results: Mapping[str, Any]) -> str:
    """The table of the README and docs/DATA_EFFICIENCY.md from a results.json's runs."""
    lines = [
        "| fraction | training images | ConViT top-1 (min .. max) | DeiT top-1 (min .. max) | gap of the means "
        "| gap per seed | verdict |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(row: Mapping[str, Any], arch: str) -> str:
        if arch not in row:
            return ""
        t = row[arch]["top1"]
        return f"**{t['mean']:.1f}** ({t['min']:.1f} .. {t['max']:.1f})"

    for row in summarize(results["runs"]):
        gap = f"{row['gap']:+.1f}" if "gap" in row else ""
        per_seed = ", ".join(f"{g:+.1f}" for g in row.get("per_seed_gap", {}).values())
        lines.append(
            f"| {row['fraction']:.0%} | {row['images']} | {cell(row, 'convit')} | {cell(row, 'deit')} | "
            f"{gap} | {per_seed} | {row.get('verdict', '')} |"
        )
    return "\n".join(lines)


def figure(results: Mapping[str, Any]):
    """Top-1 against the fraction of training images, both architectures: the
    mean over seeds (line), each seed (dots), min to max (band)."""
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    runs = results["runs"]
    summary = summarize(runs)
    for arch, color in (("convit", "tab:blue"), ("deit", "tab:orange")):
        rows = [row for row in summary if arch in row]
        if not rows:
            continue
        xs = [row["fraction"] * 100 for row in rows]
        ax.plot(xs, [row[arch]["top1"]["mean"] for row in rows], "-o", color=color, label=NAMES[arch])
        ax.fill_between(
            xs,
            [row[arch]["top1"]["min"] for row in rows],
            [row[arch]["top1"]["max"] for row in rows],
            color=color,
            alpha=0.2,
            linewidth=0,
        )
        seeds = [(r["fraction"] * 100, r["top1"]) for r in runs if r["arch"] == arch]
        ax.scatter(*zip(*seeds), s=10, color=color, alpha=0.6)
    ax.set_xscale("log")
    fractions = sorted({r["fraction"] * 100 for r in runs})
    ax.set_xticks(fractions, [f"{f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the training set (same number of images seen)")
    ax.set_ylabel("val top-1 (%)")
    seeds = len({r["seed"] for r in runs})
    seen = sorted({r["images_seen"] for r in runs})
    ax.set_title(
        f"ConViT against the DeiT of identical dimensions, supervised\n{seeds} seed{'s' * (seeds > 1)} "
        f"(band: min to max), {' / '.join(map(str, seen))} images seen by every run",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plan_runs(
    train: Path, fractions: Sequence[float], archs: Sequence[str], seeds: Sequence[int], extra: Sequence[str] = ()
) -> tuple[int, list[tuple[str, float, int, Schedule]]]:
    """(batch size, [(arch, fraction, seed, schedule)]) of a sweep; checks every name and fraction first."""
    for arch in archs:
        arch_overrides(arch)
    config = compose([f"config={CONFIG}", *extra])[1]
    batch, base_epochs = int(config.DATA.TRAIN.BATCHSIZE_PER_REPLICA), int(config.OPTIMIZER.num_epochs)
    sizes = class_sizes(train)
    plans = {f: schedule(sizes, f, batch, base_epochs) for f in fractions}
    return batch, [(arch, f, seed, plans[f]) for f in fractions for seed in seeds for arch in archs]


def sweep(
    out: Path,
    train: Path,
    val: Path,
    fractions: Sequence[float] = FRACTIONS,
    archs: Sequence[str] = tuple(ARCHS),
    seeds: Sequence[int] = SEEDS,
    extra: Sequence[str] = (),
    slots: int = 2,
    header: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every (arch, fraction, seed) not yet in ``out/results.json``, two at a
    time, and return the results (also written after each run, with `header`'s
    keys: the command, machine, date)."""
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    results.update(header or {}, data={"train": str(train), "val": str(val)}, config=CONFIG, overrides=list(extra))
    batch, planned = plan_runs(train, fractions, archs, seeds, extra)
    done = {(r["arch"], r["fraction"], r["seed"]) for r in results["runs"]}
    todo = {run_name(a, f, s): (a, f, s, plan) for a, f, s, plan in planned if (a, f, s) not in done}

    def record(stage: Stage, seconds: float) -> None:
        arch, fraction, seed, plan = todo[stage.name]
        results["runs"].append(read_run(out / stage.name, arch, seed, plan, batch, seconds))
        _write(path, results)

    def stage(name: str, arch: str, fraction: float, seed: int, plan: Schedule) -> Stage:
        overrides = run_overrides(arch, fraction, seed, plan, train, val, extra)
        title = (
            f"{NAMES[arch]}, {fraction:g} of the training set ({plan.images} images, {plan.epochs} epochs), seed {seed}"
        )
        return Stage(name, title, lambda: overrides)

    run_stages([stage(name, *args) for name, args in todo.items()], out, slots=slots, on_done=record)
    _write(path, results)
    return results


def _write(path: Path, results: dict[str, Any]) -> None:
    results["runs"].sort(key=lambda r: (r["fraction"], r["arch"], r["seed"]))
    results["summary"] = summarize(results["runs"])
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
