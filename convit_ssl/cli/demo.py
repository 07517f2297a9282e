"""`make demo` / `convit-ssl demo`: each a real VISSL run on CPU,

1. supervised training (`supervised`);
2. self-supervised pretraining with SimCLR, no labels (`ssl`);
3. linear probes on the frozen trunk of each (`linear`, `linear_ssl`) and of
   a trunk at random init (`linear_random`), and the online kNN monitor's top-1
   of the same three trunks (random init: the first record of the runs);
4. a fine-tune from the supervised checkpoint (`finetune`);

then the paper's analyses of the supervised model (`<out>/analysis`: gating,
nonlocality, attention maps, and the gates and nonlocality over training that
the analysis hook logged).

With no data it exports scikit-learn's bundled handwritten digits to an image
folder; with `--data DIR` (holding `train/<class>/*` and `val/<class>/*`) it
runs on the user's own images. Each stage runs in its own process
(`python -m convit_ssl.cli run ...`: VISSL initialises a process group per run), two at a time as soon as the stages
they start from have finished, with its progress lines echoed under its name
and its full log in `<out>/<stage>/log.txt`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from convit_ssl.checkpoints.run_folder import final_accuracies, require_final_checkpoint
from convit_ssl.cli.analyze import run_analysis
from convit_ssl.data import export_digits
from convit_ssl.processes import Stopped, forward_stop_signals

STAGES = ("supervised", "ssl", "linear", "linear_ssl", "linear_random", "finetune")
# the self-supervised stage: the method that learns most reliably at this scale (docs/SSL_SMALL_SCALE.md, tools/ssl_quality.py)
SSL_METHOD = "SimCLR"
SSL_CONFIG = "pretrain/simclr/simclr_convit_demo_digits_32"
# SimCLR at 12 of its config's 20 epochs (the demo's time budget). The probes keep
# their config's 5 epochs: at 3 the probes of the SimCLR trunk fell below those of
# the random one (measured 2026-12-01), which says nothing.
SSL_EPOCHS = 12
# the normalisation of configs/config/demo/convit_ssl/digits_*.yaml, for the analysis images
DEMO_MEAN, DEMO_STD = (0.3, 0.3, 0.3), (0.4, 0.4, 0.4)
ANALYSIS_IMAGES = 32
_PROGRESS = re.compile(r"\[ep: (\d+)\] iter: (\d+);.*?loss: ([\d.]+)")
_METER = re.compile(r"name: (train|test)_accuracy_list_meter, value: (.*)$")


def _class_count(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_dir())


def data_overrides(train: Path, val: Path) -> List[str]:
    return [
        f"config.DATA.TRAIN.DATA_PATHS=[{train}]", f"config.DATA.TRAIN.LABEL_PATHS=[{train}]",
        f"config.DATA.TEST.DATA_PATHS=[{val}]", f"config.DATA.TEST.LABEL_PATHS=[{val}]",
    ]


def _format_meter(text: str) -> str:
    """"{'top_1': {0: 93.3}}" or "{'top_1': {'lastCLS': 93.3, ...}}" -> "93.3%" or "lastCLS 93.3%, ..."."""
    top1 = ast.literal_eval(text).get("top_1", {})
    if len(top1) == 1:
        return f"{next(iter(top1.values())):.1f}%"
    return ", ".join(f"{name} {value:.1f}%" for name, value in top1.items())


@dataclass
class Stage:
    name: str                           # its folder under the output folder, one of STAGES
    title: str
    overrides: Callable[[], List[str]]  # called when it starts, after the stages it needs
    needs: Tuple[str, ...] = ()


class _Echo:
    """Progress lines of concurrent stages, one whole line at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            print(line, flush=True)


def run_stage(title: str, overrides: Sequence[str], stage_dir: Path, *, label: str = "",
              threads: Optional[int] = None, echo: Optional[Callable[[str], None]] = None,
              children: Optional[List[subprocess.Popen]] = None) -> float:
    """`python -m convit_ssl.cli run OVERRIDES` into `stage_dir` in a child process
    (with `threads` intra-op threads if given), its progress lines echoed (under
    `[label]` if given); returns the wall time. A failure raises with the last
    output lines. `children` collects the process, so that it can be stopped."""
    argv = [sys.executable, "-m", "convit_ssl.cli", "run", *overrides, f"config.CHECKPOINT.DIR={stage_dir}"]
    echo = echo or _Echo()
    echo(f"\n== {title}: convit-ssl {' '.join(argv[3:])}")
    prefix = f"[{label}] " if label else ""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.time()
    tail: List[str] = []
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               text=True, errors="replace")
    if children is not None:
        children.append(process)
    assert process.stdout is not None
    # (called alone, in the main thread: a stop signal goes to the stage; in run_stages' threads: no-op)
    with forward_stop_signals(lambda: [process]) as stop, process.stdout as output:
        for line in output:
            tail = (tail + [line.rstrip()])[-40:]
            progress = _PROGRESS.search(line)
            meter = _METER.search(line)
            if progress:
                echo(f"   {prefix}epoch {int(progress.group(1)) + 1} iter {progress.group(2)} loss {progress.group(3)}")
            elif meter:
                echo(f"   {prefix}{'val' if meter.group(1) == 'test' else 'train'} top-1: {_format_meter(meter.group(2))}")
        process.wait()
    if stop.received is not None:
        raise Stopped(stop.received, f"{title} stopped ({tail[-1] if tail else 'no output'})")
    if process.returncode != 0:
        raise RuntimeError(f"stage {title!r} failed (exit {process.returncode}); last output:\n" + "\n".join(tail))
    return time.time() - start


def run_stages(stages: Sequence[Stage], out: Path, slots: int = 2) -> Dict[str, float]:
    """Run `stages`, `slots` at a time, each as soon as the stages it needs have
    finished, in list order; each child gets cpu_count / slots threads (on 2
    cores, two 1-thread runs side by side do 1.4x the work of one 2-thread run:
    measured 0.50 s and 0.35 s per step of the demo model). Returns each wall time.
    A failed stage stops the others and raises. A stop signal goes to the
    running stages (each saves a checkpoint of its iteration), then `Stopped`."""
    threads = max(1, (os.cpu_count() or 1) // slots)
    echo, children = _Echo(), []
    times: Dict[str, float] = {}
    pending = list(stages)
    with forward_stop_signals(lambda: children) as stop, ThreadPoolExecutor(slots) as pool:
        running: Dict[Future, Stage] = {}
        while pending or running:
            for stage in [s for s in pending if all(n in times for n in s.needs)][:slots - len(running)]:
                pending.remove(stage)
                future = pool.submit(run_stage, stage.title, stage.overrides(), out / stage.name, label=stage.name,
                                     threads=threads, echo=echo, children=children)
                running[future] = stage
            if not running:
                raise ValueError(f"stages {[s.name for s in pending]} need stages that are not listed")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                stage = running.pop(future)
                try:
                    times[stage.name] = future.result()
                except BaseException:
                    if stop.received is None:  # a failure: the others are stopped at once
                        for child in children:
                            if child.poll() is None:
                                child.kill()
                        raise
                    stopped = [s.name for s in stages if s is stage or s in running.values()]
                    wait(running)  # the others save their checkpoints (at most the grace period)
                    raise Stopped(stop.received, f"stopped the stages {', '.join(stopped)}; the same command "
                                                 "resumes them (finished stages are reused)") from None
    return times


def _claim_output(out: Path, train: Path, val: Path) -> None:
    """Record which data `out` belongs to. Re-running into the same folder
    resumes (VISSL's auto-resume skips finished stages); other data is refused."""
    record = out / "demo_data.json"
    data = {"train": str(train), "val": str(val)}
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous != data:
            raise FileExistsError(
                f"{out} holds a demo run on other data ({previous['train']}); choose another --out or remove it"
            )
        print(f"{out} holds an earlier demo run on the same data: finished stages are reused (remove it to start afresh)")
    elif any((out / stage).exists() for stage in STAGES):
        raise FileExistsError(f"{out} holds stage folders of an unknown run; choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(data))


def _analyse(checkpoint: Path, val: Path, out: Path) -> Path:
    """`convit-ssl analyze` of the supervised checkpoint on the first validation
    images, with the hook's log of the supervised run; returns the figure folder."""
    figures = out / "analysis"
    print(f"\n== analysis: convit-ssl analyze {checkpoint} --images {val} --out {figures}")
    log = out / "supervised" / "convit_analysis.jsonl"
    run_analysis(checkpoint, val, figures, num_images=ANALYSIS_IMAGES, mean=DEMO_MEAN, std=DEMO_STD,
                 log_path=log if log.exists() else None, overwrite=True, log=lambda line: print("   " + line))
    return figures


def _knn_overrides(train: Path, val: Path, epochs: int) -> List[str]:
    """The online kNN monitor at the start (random init) and after the last of `epochs` epochs."""
    return ["+config/convit_ssl/hooks=knn", f"config.HOOKS.CONVIT_KNN.TRAIN_PATHS=[{train}]",
            f"config.HOOKS.CONVIT_KNN.VAL_PATHS=[{val}]", f"config.HOOKS.CONVIT_KNN.FREQUENCY_EPOCHS={epochs}"]


def _knn_ends(stage_dir: Path) -> Tuple[float, float]:
    """kNN top-1 of the stage's trunk at random init and at the end (the monitor's first and last records)."""
    from convit_ssl.vissl.knn_hook import read_records

    records = read_records(stage_dir)
    return records[0]["student"]["top1"], records[-1]["student"]["top1"]


def run_demo(out: os.PathLike, data: Optional[os.PathLike] = None, epochs: Optional[int] = None,
             ssl_epochs: Optional[int] = None, probe_epochs: Optional[int] = None) -> Dict[str, dict]:
    """Run the stages; print and return a summary. `epochs` (supervised) and
    `probe_epochs` (the linear probes and the fine-tune) default to the configs',
    `ssl_epochs` to SSL_EPOCHS."""
    from convit_ssl.vissl.configs import num_epochs

    out = Path(out).resolve()
    if data is None:
        train, val = export_digits(out / "digits")
        print(f"exported scikit-learn digits to {train.parent} (train {sum(1 for _ in train.rglob('*.png'))}, "
              f"val {sum(1 for _ in val.rglob('*.png'))} images)")
    else:
        train, val = Path(data).resolve() / "train", Path(data).resolve() / "val"
        for folder in (train, val):
            if not folder.is_dir():
                raise FileNotFoundError(f"--data {data}: expected {folder} with one sub-folder per class")
    _claim_output(out, train, val)
    classes = _class_count(train)
    common = data_overrides(train, val)
    if classes != 10:
        common += [f"config.MODEL.HEAD.PARAMS=[[mlp,{{dims:[96,{classes}]}}]]"]
    probe = [f"config.OPTIMIZER.num_epochs={probe_epochs}"] if probe_epochs else []
    linear = ["config=demo/convit_ssl/digits_linear", *common, *probe]
    if classes != 10:
        linear += [f"config.MODEL.HEAD.PARAMS=[[eval_mlp,{{in_channels:96,dims:[96,{classes}]}}],"
                   f"[eval_mlp,{{in_channels:192,dims:[192,{classes}]}}]]"]
    supervised = ["config=demo/convit_ssl/digits_supervised", *common,
                  *([f"config.OPTIMIZER.num_epochs={epochs}"] if epochs else [])]
    supervised += _knn_overrides(train, val, num_epochs(supervised))
    ssl = [f"config={SSL_CONFIG}", f"config.DATA.TRAIN.DATA_PATHS=[{train}]", f"config.DATA.TRAIN.LABEL_PATHS=[{train}]",
           f"config.OPTIMIZER.num_epochs={ssl_epochs or SSL_EPOCHS}"]
    ssl += _knn_overrides(train, val, num_epochs(ssl))

    def from_checkpoint(stage: str, overrides: List[str]) -> Callable[[], List[str]]:
        return lambda: [*overrides, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={require_final_checkpoint(out / stage)}"]

    finetune = ["config=demo/convit_ssl/digits_finetune", *common, *probe]
    times = run_stages([  # the longest first
        Stage("ssl", f"self-supervised ({SSL_METHOD})", lambda: ssl),
        Stage("supervised", "supervised", lambda: supervised),
        Stage("linear_random", "linear (random trunk)", lambda: linear),
        Stage("linear", "linear", from_checkpoint("supervised", linear), needs=("supervised",)),
        Stage("finetune", "finetune", from_checkpoint("supervised", finetune), needs=("supervised",)),
        Stage("linear_ssl", f"linear ({SSL_METHOD} trunk)", from_checkpoint("ssl", linear), needs=("ssl",)),
    ], out)

    summary: Dict[str, dict] = {name: {"seconds": round(times[name], 1), **final_accuracies(out / name)}
                                for name in STAGES if name != "ssl"}
    summary["ssl"] = {"seconds": round(times["ssl"], 1), "method": SSL_METHOD}
    random_knn, supervised_knn = _knn_ends(out / "supervised")
    _, ssl_knn = _knn_ends(out / "ssl")
    summary["knn"] = {"random_init": random_knn, "ssl": ssl_knn, "supervised": supervised_knn}
    figures = _analyse(require_final_checkpoint(out / "supervised"), val, out)
    _print_summary(summary, classes, out, figures)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _print_summary(summary: Dict[str, dict], classes: int, out: Path, figures: Path) -> None:
    def top1(stage: str) -> str:
        test = summary[stage].get("test", {})
        return ", ".join(f"{v:.1f}%" if len(test) == 1 else f"{k} {v:.1f}%" for k, v in test.items())

    print(f"\n== summary ({classes} classes, chance {100 / classes:.1f}%)")
    print(f"   supervised training                          val top-1 {top1('supervised')}  "
          f"({summary['supervised']['seconds']:.0f} s)")
    print(f"   {SSL_METHOD} pretraining (no labels)               ({summary['ssl']['seconds']:.0f} s)")
    print("   frozen trunk          kNN top-1   linear probes (val top-1)")
    knn = summary["knn"]
    for label, name, stage in (("random init", "random_init", "linear_random"), (SSL_METHOD, "ssl", "linear_ssl"),
                               ("supervised", "supervised", "linear")):
        print(f"   {label:<21} {knn[name]:>6.1f}%     {top1(stage)}")
    print(f"   fine-tune from the supervised checkpoint     val top-1 {top1('finetune')}  "
          f"({summary['finetune']['seconds']:.0f} s)")
    print(f"   checkpoints and logs (log.txt, metrics.json, tb_logs/): {out}/{{{','.join(STAGES)}}}")
    print(f"   figures of the supervised model (gating, nonlocality, attention maps, training curves): {figures}")
