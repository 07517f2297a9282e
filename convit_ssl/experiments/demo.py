"""`make demo` / `convit-ssl demo`: each stage a real VISSL run on the CPU,
each making one point on scikit-learn's handwritten digits (or the user's
own image folder):

1. supervised training of the demo-size ConViT (`supervised`);
2. data efficiency: the same training on a small fraction of the training
   set (`DATA.TRAIN.SUBSET`), seeing as many images, for ConViT and for the
   DeiT of identical dimensions (`efficiency_convit`, `efficiency_deit`):
   the paper's claim, as measured by tools/data_efficiency.py;
3. self-supervised pretraining with SimCLR, no labels, 20 epochs (`ssl`),
   the online kNN monitor tracing it from the random init;
4. linear probes on the frozen trunks of the random init, of SimCLR and of
   the supervised run (`linear_random`, `linear_ssl`, `linear`), on the
   class token (`lastCLS`, `concatCLS2`), trained on 10 % of the labels: with
   all of them, a linear layer on the random convolution-like trunk already
   reads 86-92 % of the digits (measured, tools/linear_probe.py), so what
   self-supervision adds shows where labels are few;
5. a fine-tune from the supervised checkpoint (`finetune`);

then the paper's analyses of the supervised model and the demo's own figures
(`<out>/analysis`: gating, nonlocality, attention maps, the gates over
training; the data-efficiency bars and the SSL kNN curve).

Each stage runs in its own process (`python -m convit_ssl.cli run ...`), two
at a time (`stages.run_stages`), its full log in `<out>/<stage>/log.txt`.
The same command resumes a stopped demo (finished stages are reused).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from convit_ssl.analysis.pipeline import run_analysis
from convit_ssl.analysis.plots import save_png
from convit_ssl.checkpoints import run_folder
from convit_ssl.checkpoints.run_folder import final_accuracies, require_final_checkpoint
from convit_ssl.data.digits import train_val_folders
from convit_ssl.experiments import data_efficiency
from convit_ssl.experiments.overrides import data_overrides, knn_overrides, train_overrides
from convit_ssl.experiments.stages import Stage, run_stages
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.hooks.knn import read_records

SUPERVISED_CONFIG = "demo/convit_ssl/digits_supervised"
LINEAR_CONFIG = "demo/convit_ssl/digits_linear_few_labels"
FINETUNE_CONFIG = "demo/convit_ssl/digits_finetune"
# The self-supervised stage: SimCLR, the fastest of the six methods to gain (docs/SSL_SMALL_SCALE.md),
# for its config's 20 epochs: at 18, a converged probe of concatCLS2 on 10 % of the labels gained
# 3 points over the random init, at 20 it gains 7 (docs/DEMO.md).
SSL_METHOD = "SimCLR"
SSL_CONFIG = "pretrain/simclr/simclr_convit_demo_digits_32"
SSL_EPOCHS = 20
SSL_KNN_EVERY = 5  # epochs between the kNN monitor's records of the SSL run (the curve)
# The probes train on the config's SUBSET of the labels (10 % of each class) for as many
# images as PROBE_EPOCHS epochs of all of them.
PROBE_EPOCHS = 5
# The data-efficiency stage: the fraction where the seeds of tools/data_efficiency.py separate
# (docs/DATA_EFFICIENCY.md), seed 0 (that table's first seed).
EFFICIENCY_FRACTION = 0.25
EFFICIENCY_SEED = 0
STAGES = (
    "supervised",
    "efficiency_convit",
    "efficiency_deit",
    "ssl",
    "linear",
    "linear_ssl",
    "linear_random",
    "finetune",
)
# the normalisation of configs/config/demo/convit_ssl/digits_*.yaml, for the analysis images
DEMO_MEAN, DEMO_STD = (0.3, 0.3, 0.3), (0.4, 0.4, 0.4)
ANALYSIS_IMAGES = 32
SUMMARY = "summary.json"
DATA_RECORD = "demo_data.json"


def _claim_output(out: Path, train: Path, val: Path) -> None:
    """Record which data `out` belongs to. Re-running into the same folder
    resumes (VISSL's auto-resume skips finished stages); other data is refused."""
    record = out / DATA_RECORD
    data = {"train": str(train), "val": str(val)}
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous != data:
            raise FileExistsError(
                f"{out} holds a demo run on other data ({previous['train']}); choose another --out or remove it"
            )
        print(
            f"{out} holds an earlier demo run on the same data: finished stages are reused (remove it to start afresh)"
        )
    elif any((out / stage).exists() for stage in STAGES):
        raise FileExistsError(f"{out} holds stage folders of an unknown run; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(data))


def _head_overrides(classes: int, linear: bool) -> list[str]:
    """The heads of the configs (10 classes) for another number of classes."""
    if classes == 10:
        return []
    if linear:
        return [
            f"config.MODEL.HEAD.PARAMS=[[eval_mlp,{{in_channels:96,dims:[96,{classes}]}}],"
            f"[eval_mlp,{{in_channels:192,dims:[192,{classes}]}}]]"
        ]
    return [f"config.MODEL.HEAD.PARAMS=[[mlp,{{dims:[96,{classes}]}}]]"]


def _schedule(
    sizes: Sequence[int], fraction: float, batch: int, base_epochs: int, what: str
) -> data_efficiency.Schedule:
    """`data_efficiency.schedule`, refusing a training folder too small for it in the demo's terms."""
    images = sum(int(n * fraction) for n in sizes)
    if images < batch:
        raise ValueError(
            f"--data: {what} on {fraction:.0%} of each class, {images} of the {sum(sizes)} training "
            f"images here, fewer than one batch of {batch}; the demo needs about "
            f"{int(batch / fraction) + len(sizes)} training images or more"
        )
    return data_efficiency.schedule(sizes, fraction, batch, base_epochs)


def _knn_curve(stage_dir: Path) -> list[list[float]]:
    """[epochs trained, kNN top-1] of each record of the stage's kNN monitor (0: the random init)."""
    return [
        [0 if r["iteration"] == 0 else r["epoch"] + 1, round(r["student"]["top1"], 2)] for r in read_records(stage_dir)
    ]


def run_demo(
    out: os.PathLike,
    data: os.PathLike | None = None,
    epochs: int | None = None,
    ssl_epochs: int | None = None,
    probe_epochs: int | None = None,
) -> dict[str, Any]:
    """Run the stages; print and return the summary (also `<out>/summary.json`).
    `epochs` (supervised, and the data-efficiency pair's images seen),
    `ssl_epochs` and `probe_epochs` (the probes' images seen, in epochs of all
    labels, and the fine-tune's epochs) default to the configs'."""
    out = Path(out).resolve()
    train, val = train_val_folders(data, out)
    if data is None:
        print(
            f"exported scikit-learn digits to {train.parent} (train {sum(1 for _ in train.rglob('*.png'))}, "
            f"val {sum(1 for _ in val.rglob('*.png'))} images)"
        )
    _claim_output(out, train, val)
    sizes = data_efficiency.class_sizes(train)
    classes = len(sizes)
    common = [*data_overrides(train, val), *_head_overrides(classes, linear=False)]
    supervised = [
        f"config={SUPERVISED_CONFIG}",
        *common,
        *([f"config.OPTIMIZER.num_epochs={epochs}"] if epochs else []),
    ]
    config = compose(supervised)[1]
    batch, base_epochs = int(config.DATA.TRAIN.BATCHSIZE_PER_REPLICA), int(config.OPTIMIZER.num_epochs)
    supervised += knn_overrides(train, val, base_epochs)

    efficiency = _schedule(sizes, EFFICIENCY_FRACTION, batch, base_epochs, "the data-efficiency pair trains")
    pair = {
        arch: data_efficiency.run_overrides(
            arch, EFFICIENCY_FRACTION, EFFICIENCY_SEED, efficiency, train, val, _head_overrides(classes, linear=False)
        )
        for arch in ("convit", "deit")
    }

    ssl_run_epochs = ssl_epochs or SSL_EPOCHS
    ssl = [
        f"config={SSL_CONFIG}",
        *train_overrides(train),
        f"config.OPTIMIZER.num_epochs={ssl_run_epochs}",
        *knn_overrides(train, val, min(SSL_KNN_EVERY, ssl_run_epochs)),
    ]

    linear_config = compose([f"config={LINEAR_CONFIG}", *data_overrides(train, val)])[1]
    probe_plan = _schedule(
        sizes,
        float(linear_config.DATA.TRAIN.SUBSET.FRACTION),
        int(linear_config.DATA.TRAIN.BATCHSIZE_PER_REPLICA),
        probe_epochs or PROBE_EPOCHS,
        "the linear probes train",
    )
    linear = [
        f"config={LINEAR_CONFIG}",
        *data_overrides(train, val),
        *_head_overrides(classes, linear=True),
        f"config.OPTIMIZER.num_epochs={probe_plan.epochs}",
        f"config.TEST_EVERY_NUM_EPOCH={probe_plan.test_every}",
        f"config.CHECKPOINT.CHECKPOINT_FREQUENCY={probe_plan.epochs}",
    ]
    finetune = [
        f"config={FINETUNE_CONFIG}",
        *common,
        *([f"config.OPTIMIZER.num_epochs={probe_epochs}"] if probe_epochs else []),
    ]

    def from_checkpoint(stage: str, overrides: list[str]) -> Callable[[], list[str]]:
        return lambda: [*overrides, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={require_final_checkpoint(out / stage)}"]

    efficiency_title = (
        f"{{}} on {EFFICIENCY_FRACTION:.0%} of the training set ({efficiency.images} images, "
        f"{efficiency.epochs} epochs)"
    )
    times = run_stages(
        [  # the longest first
            Stage("ssl", f"self-supervised ({SSL_METHOD})", lambda: ssl),
            Stage("supervised", "supervised", lambda: supervised),
            Stage("efficiency_convit", efficiency_title.format("ConViT"), lambda: pair["convit"]),
            Stage("efficiency_deit", efficiency_title.format("DeiT"), lambda: pair["deit"]),
            Stage("linear_random", "linear probes (random trunk)", lambda: linear),
            Stage(
                "linear",
                "linear probes (supervised trunk)",
                from_checkpoint("supervised", linear),
                needs=("supervised",),
            ),
            Stage("finetune", "fine-tune", from_checkpoint("supervised", finetune), needs=("supervised",)),
            Stage("linear_ssl", f"linear probes ({SSL_METHOD} trunk)", from_checkpoint("ssl", linear), needs=("ssl",)),
        ],
        out,
    )

    summary: dict[str, Any] = {
        name: {"seconds": round(times[name], 1), **final_accuracies(out / name)} for name in STAGES if name != "ssl"
    }
    summary["ssl"] = {
        "seconds": round(times["ssl"], 1),
        "method": SSL_METHOD,
        "epochs": ssl_run_epochs,
        "knn_curve": _knn_curve(out / "ssl"),
    }
    supervised_curve = _knn_curve(out / "supervised")
    summary["knn"] = {
        "random_init": supervised_curve[0][1],
        "ssl": summary["ssl"]["knn_curve"][-1][1],
        "supervised": supervised_curve[-1][1],
    }
    summary["efficiency"] = {
        "fraction": EFFICIENCY_FRACTION,
        "seed": EFFICIENCY_SEED,
        "images": efficiency.images,
        "of": sum(sizes),
        "epochs": efficiency.epochs,
        "images_seen": efficiency.iterations * batch,
    }
    summary["probes"] = {"fraction": probe_plan.fraction, "images": probe_plan.images, "epochs": probe_plan.epochs}
    figures = out / "analysis"
    print(
        f"\n== analysis: convit-ssl analyze {require_final_checkpoint(out / 'supervised')} --images {val} "
        f"--out {figures}"
    )
    log = out / "supervised" / run_folder.ANALYSIS_RECORDS
    run_analysis(
        require_final_checkpoint(out / "supervised"),
        val,
        figures,
        num_images=ANALYSIS_IMAGES,
        mean=DEMO_MEAN,
        std=DEMO_STD,
        log_path=log if log.exists() else None,
        overwrite=True,
        log=lambda line: print("   " + line),
    )
    summary["figures"] = {
        "data_efficiency": str(save_png(efficiency_figure(summary), figures / "data_efficiency.png")),
        "ssl_knn": str(save_png(ssl_knn_figure(summary), figures / "ssl_knn.png")),
    }
    print_summary(summary, classes, out, figures)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def _top1(summary: Mapping[str, Any], stage: str) -> dict[str, float]:
    return summary[stage].get("test", {})


def efficiency_figure(summary: Mapping[str, Any]) -> Figure:
    """Bars: val top-1 of ConViT and DeiT trained on the small fraction, and of ConViT on all of it."""
    fig = Figure(figsize=(5.2, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    eff = summary["efficiency"]
    labels = [
        f"ConViT\n{eff['fraction']:.0%} ({eff['images']} images)",
        f"DeiT\n{eff['fraction']:.0%} ({eff['images']} images)",
        f"ConViT\n100% ({eff['of']} images)",
    ]
    values = [next(iter(_top1(summary, s).values())) for s in ("efficiency_convit", "efficiency_deit", "supervised")]
    bars = ax.bar(labels, values, color=["tab:blue", "tab:orange", "lightsteelblue"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.5, f"{value:.1f}%", ha="center", va="bottom")
    ax.set_ylim(max(0.0, min(values) - 20), 100)
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"data efficiency: {eff['images_seen']} images seen by every run", fontsize=10)
    fig.tight_layout()
    return fig


def ssl_knn_figure(summary: Mapping[str, Any]) -> Figure:
    """kNN top-1 of the SimCLR trunk over its epochs, against the random init and the supervised trunk."""
    fig = Figure(figsize=(5.2, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curve = summary["ssl"]["knn_curve"]
    knn = summary["knn"]
    ax.plot(*zip(*curve), "-o", color="tab:green", label=f"{summary['ssl']['method']} (no labels)")
    ax.axhline(knn["random_init"], color="grey", linestyle="--", label=f"random init {knn['random_init']:.1f}%")
    ax.axhline(knn["supervised"], color="tab:blue", linestyle=":", label=f"supervised {knn['supervised']:.1f}%")
    ax.set_xlabel("epochs of self-supervised pretraining")
    ax.set_ylabel("kNN top-1 on val (%)")
    ax.set_title("kNN (k = 20, cosine) of the frozen class token", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def print_summary(summary: Mapping[str, Any], classes: int, out: Path, figures: Path) -> None:
    def top1(stage: str) -> str:
        test = _top1(summary, stage)
        return ", ".join(f"{v:.1f}%" if len(test) == 1 else f"{k} {v:.1f}%" for k, v in sorted(test.items()))

    def gain(stage: str, feature: str) -> str:
        return f"{_top1(summary, stage)[feature] - _top1(summary, 'linear_random')[feature]:+.1f}"

    eff, knn, probes = summary["efficiency"], summary["knn"], summary["probes"]
    print(f"\n== summary ({classes} classes, chance {100 / classes:.1f}%)")
    print(
        f"   supervised ConViT, all {eff['of']} training images        val top-1 {top1('supervised')}  "
        f"({summary['supervised']['seconds']:.0f} s)"
    )
    print(
        f"   data efficiency: {eff['fraction']:.0%} of the training set ({eff['images']} images), as many images seen"
    )
    print(
        f"     ConViT {top1('efficiency_convit')}   DeiT of identical dimensions {top1('efficiency_deit')}"
        f"   (seed {eff['seed']}; 3 seeds: docs/DATA_EFFICIENCY.md)"
    )
    print(
        f"   {summary['ssl']['method']} pretraining, no labels, {summary['ssl']['epochs']} epochs "
        f"({summary['ssl']['seconds']:.0f} s)"
    )
    print(
        f"   frozen trunk    kNN top-1 (all {eff['of']} labels)   linear probes on {probes['fraction']:.0%} of the "
        f"labels ({probes['images']} images)"
    )
    for label, name, stage in (
        ("random init", "random_init", "linear_random"),
        (summary["ssl"]["method"], "ssl", "linear_ssl"),
        ("supervised", "supervised", "linear"),
    ):
        print(f"   {label:<15} {knn[name]:>6.1f}%                  {top1(stage)}")
    print(
        f"   {summary['ssl']['method']} gains over random init: kNN {knn['ssl'] - knn['random_init']:+.1f}, "
        f"lastCLS {gain('linear_ssl', 'lastCLS')}, concatCLS2 {gain('linear_ssl', 'concatCLS2')} points"
    )
    print("     (VISSL's probes stop after a fixed number of SGD steps; converged, the gains are smaller, still above")
    print(
        "      5 points. Few labels, the class token: with all labels a linear probe of the random trunk already reads"
    )
    print("      86-92%, and its mean patch tokens stay within 3 points of SimCLR's. docs/DEMO.md)")
    print(
        f"   fine-tune from the supervised checkpoint           val top-1 {top1('finetune')}  "
        f"({summary['finetune']['seconds']:.0f} s)"
    )
    print(f"   checkpoints and logs (log.txt, metrics.json): {out}/{{{','.join(STAGES)}}}")
    print(
        f"   figures: {figures}/data_efficiency.png (ConViT and DeiT on {eff['fraction']:.0%}), "
        f"{figures}/ssl_knn.png (kNN over SimCLR's epochs),"
    )
    print(f"            and of the supervised model: gating, nonlocality, attention maps, training curves ({figures})")
