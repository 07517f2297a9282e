"""Helpers shared by the tests (`from helpers import ...`; tests/ is on sys.path
because the test folders below it are packages): the repository's paths, Hydra
overrides for the digits, runners of real VISSL jobs, model helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import torch

import warm
from convit_ssl.experiments.overrides import data_overrides

REPO = Path(__file__).resolve().parents[1]
RUN_SCRIPT = REPO / "tools" / "run_distributed_engines.py"


def folder_overrides(root: Path) -> list[str]:
    """An image folder's train/ and val/ as the training and the test split."""
    return data_overrides(root / "train", root / "val")


def run_engine(overrides: list[str], cwd: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python tools/run_distributed_engines.py OVERRIDES` from `cwd` (not the repo)."""
    proc = run_warm([str(RUN_SCRIPT), *overrides], cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"VISSL run failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    return proc


def filelist_overrides(root: Path, labels: str) -> list[str]:
    """DATA_PATHS / LABEL_PATHS of `digits_filelists`; `labels` is "labels" or "voc_labels"."""
    return [
        f"config.DATA.TRAIN.DATA_PATHS=[{root / 'train_images.npy'}]",
        f"config.DATA.TRAIN.LABEL_PATHS=[{root / f'train_{labels}.npy'}]",
        f"config.DATA.TEST.DATA_PATHS=[{root / 'test_images.npy'}]",
        f"config.DATA.TEST.LABEL_PATHS=[{root / f'test_{labels}.npy'}]",
    ]


def run_tool(tool: str, overrides: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python tools/<tool>.py OVERRIDES` from `cwd`; fails the test on a non-zero exit."""
    proc = run_warm([str(REPO / "tools" / f"{tool}.py"), *overrides], cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"tools/{tool}.py failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    return proc


def _as_fresh_process(fn, index, *args):
    """A forked rank ends as a spawned one would: with the exit handlers it
    registered itself (VISSL closes stdout.json in one), not its launcher's."""
    import atexit

    atexit._clear()
    try:
        fn(index, *args)
    finally:
        warm.exit_as_an_interpreter()


def fork_ranks() -> None:
    """In a warm child (its `prepare`): the ranks VISSL's launcher starts with
    torch.multiprocessing.spawn, fresh interpreters importing everything again
    (6-8 s each), are forks of the launcher instead: the same worker, arguments
    and process tree (children of the launcher), without the pickling and the
    re-import of `__main__`. That spawn path stays tested where a tool starts in
    a fresh interpreter (test_launcher.test_cli_run_trains_on_two_processes, the
    two-host test)."""
    import functools

    import torch.multiprocessing as torch_mp

    def spawn(fn, args=(), nprocs=1, join=True, daemon=False, start_method="spawn"):
        worker = functools.partial(_as_fresh_process, fn)
        return torch_mp.start_processes(worker, args, nprocs, join, daemon, start_method="fork")

    torch_mp.spawn = spawn


class WarmProcess:
    """A tool script running in a fork of the warm Python (tests/warm.py), with
    the part of subprocess.Popen the tests use: pid, poll(), wait(timeout),
    kill() (of its process group: the ranks it started too), returncode."""

    def __init__(self, process: BaseProcess, argv: list[str]) -> None:
        self.process, self.args, self.pid = process, argv, process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_warm(argv: list[str], cwd: Path, output: Path, forked_ranks: bool = True) -> WarmProcess:
    """Start `python ARGV` from `cwd` in a fork of a Python that has already
    imported VISSL (tests/warm.py): the same script, arguments and environment
    (PYTHONWARNINGS=ignore), without 6-8 s of imports per run, in a process group
    of its own; stdout and stderr go to `output`. With `forked_ranks` the ranks
    VISSL starts are forks of it too (`fork_ranks`), else fresh interpreters."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    process = warm.start(
        argv, output=output, cwd=cwd, env=env, new_session=True, prepare=fork_ranks if forked_ranks else None
    )
    return WarmProcess(process, argv)


def run_warm(
    argv: list[str], cwd: Path, timeout: float = 300, forked_ranks: bool = True
) -> subprocess.CompletedProcess:
    """`start_warm`, waited for; its output as text, as subprocess.run(..., text=True) gives it."""
    with tempfile.NamedTemporaryFile(prefix="warm_run_", suffix=".log", delete=False) as f:
        output = Path(f.name)
    try:
        process = start_warm(argv, cwd, output, forked_ranks)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise subprocess.TimeoutExpired(argv, timeout, output=output.read_text(errors="replace")) from None
        return subprocess.CompletedProcess([sys.executable, *argv], code, stdout=output.read_text(errors="replace"))
    finally:
        output.unlink(missing_ok=True)


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Make weights look trained: every parameter gets N(0, 0.02^2) noise (the
    local init, the unit norms and the zero biases are all broken), and the
    gates get a larger spread so that heads mix content and position differently."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
            if name.endswith("gating_param"):
                p.add_(torch.randn(p.shape, generator=gen))


def block_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Raw output of every block of a ConViT on `x`, captured by forward hooks."""
    outs: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return outs


LOCALITY_DIM = 10  # VISSL's default


def vissl_builtin_trunk(width: int, heads: int, qkv_bias: bool, mlp_dim: int, seed: int = 0) -> torch.nn.Module:
    """VISSL's built-in convit trunk (3 blocks: 2 GPSA + 1 MHSA, 32 px, 8 px patches),
    perturbed to look trained, in eval mode."""
    from vissl.models.trunks.convit import ConViT as VisslConViT

    from convit_ssl.vissl.configs import compose

    vt = "config.MODEL.TRUNK.VISION_TRANSFORMERS."
    _, cfg = compose(
        [
            "config=test/convit_ssl/supervised_micro_synthetic",
            "config.MODEL.TRUNK.NAME=convit",
            f"{vt}IMAGE_SIZE=32",
            f"{vt}PATCH_SIZE=8",
            f"{vt}HIDDEN_DIM={width}",
            f"{vt}NUM_HEADS={heads}",
            f"{vt}NUM_LAYERS=3",
            f"{vt}MLP_DIM={mlp_dim}",
            f"{vt}QKV_BIAS={qkv_bias}",
            f"{vt}DROP_PATH_RATE=0",
            f"{vt}DROPOUT_RATE=0",
            f"{vt}ATTENTION_DROPOUT_RATE=0",
            "config.MODEL.TRUNK.CONVIT.N_GPSA_LAYERS=2",
            f"config.MODEL.TRUNK.CONVIT.LOCALITY_DIM={LOCALITY_DIM}",
        ]
    )
    torch.manual_seed(seed)
    trunk = VisslConViT(cfg.MODEL, "convit")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
            if name.endswith("attn.alpha") or name.endswith("attn.pos_proj.weight"):
                # gates spread around sigmoid(1); the L copies of each of dx, dy, d2
                # get different weights, so only their sum / L is meaningful
                p.add_(torch.randn(p.shape, generator=gen))
    return trunk.eval()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def kmeans_on_ranks(memory: torch.Tensor, clusters: int, world: int, out: Path) -> dict[str, torch.Tensor]:
    """DeepCluster-v2's distributed k-means (upstream.cluster_memory) on `world`
    gloo processes, each holding a consecutive share of `memory`; rank 0's result
    (tests/kmeans_ranks.py)."""
    memory_file = out.with_name(out.name + ".memory.pt")
    torch.save(memory, memory_file)
    script = Path(__file__).with_name("kmeans_ranks.py")
    proc = run_warm([str(script), str(memory_file), str(clusters), str(world), str(out)], cwd=out.parent, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return torch.load(out)


def assert_started_from_resampled(pos_embed, pretrained, old_grid=(4, 4), new_grid=(6, 6)) -> None:
    """A fine-tuned position embedding started from the pretrained one resampled to `new_grid`
    (it stays far closer to that than a fresh initialisation is)."""
    from convit_ssl.checkpoints.resample import resample_state_dict
    from convit_ssl.models import create_model

    resampled = resample_state_dict({"pos_embed": pretrained}, new_grid, old_grid)["pos_embed"]
    width = pretrained.shape[-1]
    fresh = create_model(
        "convit_tiny",
        img_size=8 * new_grid[0],
        patch_size=8,
        width=width,
        depth=2,
        num_gpsa_layers=1,
        num_heads=width // 12,
    ).pos_embed.detach()
    moved = (pos_embed - resampled).abs().max().item()
    assert moved < 0.2 * (fresh - resampled).abs().max().item(), moved


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `folder` with `options` (`ro`, `size=2m`): a real read-only
    or full file system (root writes through permission bits, not through these).
    Skips the test where mounting is not allowed; unmounted lazily after (a
    traceback may still hold a file open in it)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)
