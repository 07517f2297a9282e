"""Helpers shared by the tests (`from helpers import ...`; tests/ is on sys.path
because the test folders below it are packages): the repository's paths, Hydra
overrides for the digits, runners of real VISSL jobs, model helpers."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
RUN_SCRIPT = REPO / "tools" / "run_distributed_engines.py"


def folder_overrides(root: Path) -> List[str]:
    train, val = root / "train", root / "val"
    return [
        f"config.DATA.TRAIN.DATA_PATHS=[{train}]", f"config.DATA.TRAIN.LABEL_PATHS=[{train}]",
        f"config.DATA.TEST.DATA_PATHS=[{val}]", f"config.DATA.TEST.LABEL_PATHS=[{val}]",
    ]


def run_engine(overrides: List[str], cwd: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python tools/run_distributed_engines.py OVERRIDES` from `cwd` (not the repo)."""
    proc = run_warm([str(RUN_SCRIPT), *overrides], cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"VISSL run failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    return proc


def filelist_overrides(root: Path, labels: str) -> List[str]:
    """DATA_PATHS / LABEL_PATHS of `digits_filelists`; `labels` is "labels" or "voc_labels"."""
    return [
        f"config.DATA.TRAIN.DATA_PATHS=[{root / 'train_images.npy'}]",
        f"config.DATA.TRAIN.LABEL_PATHS=[{root / f'train_{labels}.npy'}]",
        f"config.DATA.TEST.DATA_PATHS=[{root / 'test_images.npy'}]",
        f"config.DATA.TEST.LABEL_PATHS=[{root / f'test_{labels}.npy'}]",
    ]


def run_tool(tool: str, overrides: List[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python tools/<tool>.py OVERRIDES` from `cwd`; fails the test on a non-zero exit."""
    proc = run_warm([str(REPO / "tools" / f"{tool}.py"), *overrides], cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"tools/{tool}.py failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    return proc


class WarmProcess:
    """A tool script running in a fork of tests/warm_python.py, with the part of
    subprocess.Popen the tests use: pid, poll(), wait(timeout), kill() (of its
    process group: the ranks it spawned too), returncode."""

    def __init__(self, conn: socket.socket, argv: List[str]) -> None:
        self.conn, self.args, self.returncode = conn, argv, None
        self._buffer = b""
        self.pid = int(self._line(timeout=60))

    def _line(self, timeout: Optional[float]) -> str:
        """The next line from the child; "" when it closed without one (it was killed)."""
        self.conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self.conn.recv(64)
            if not chunk:
                return ""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            try:
                line = self._line(timeout)
            except (socket.timeout, BlockingIOError):
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            self.returncode = int(line) if line else -signal.SIGKILL  # no line: killed before it could answer
            self.conn.close()
        return self.returncode

    def poll(self) -> Optional[int]:
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _WarmPython:
    """The client of tests/warm_python.py: one server per test process, started
    at first use and stopped at exit."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="warm_python_"))
        self.socket = self.folder / "socket"
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("warm_python.py")),
                                        str(self.socket)], env=env, stdout=subprocess.PIPE, text=True)
        ready = self.server.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"tests/warm_python.py did not start (exit {self.server.poll()}): {ready!r}")
        atexit.register(self.close)

    def close(self) -> None:
        self.server.kill()
        self.server.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def start(self, argv: List[str], cwd: Path, output: Path, fork_ranks: bool) -> WarmProcess:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self.socket))
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        request = {"argv": argv, "cwd": str(cwd), "env": env, "output": str(output), "fork_ranks": fork_ranks}
        conn.sendall((json.dumps(request) + "\n").encode())
        return WarmProcess(conn, argv)


_warm: Optional[_WarmPython] = None


def start_warm(argv: List[str], cwd: Path, output: Path, fork_ranks: bool = True) -> WarmProcess:
    """Start `python ARGV` from `cwd` in a fork of a Python that has already
    imported VISSL (tests/warm_python.py): the same script, arguments and
    environment, without 6-7 s of imports per run; stdout and stderr go to
    `output`. With `fork_ranks` the ranks VISSL starts are forks of it too,
    else fresh interpreters (VISSL's torch.multiprocessing.spawn)."""
    global _warm
    if _warm is None or _warm.server.poll() is not None:
        _warm = _WarmPython()
    return _warm.start(argv, cwd, output, fork_ranks)


def run_warm(argv: List[str], cwd: Path, timeout: float = 300, fork_ranks: bool = True) -> subprocess.CompletedProcess:
    """`start_warm`, waited for; its output as text, as subprocess.run(..., text=True) gives it."""
    with tempfile.NamedTemporaryFile(prefix="warm_run_", suffix=".log", delete=False) as f:
        output = Path(f.name)
    try:
        process = start_warm(argv, cwd, output, fork_ranks)
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


def block_outputs(model: torch.nn.Module, x: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Raw output of every block of a ConViT on `x`, captured by forward hooks."""
    outs: Dict[int, torch.Tensor] = {}
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
    _, cfg = compose([
        "config=test/convit_ssl/supervised_micro_synthetic",
        "config.MODEL.TRUNK.NAME=convit",
        f"{vt}IMAGE_SIZE=32", f"{vt}PATCH_SIZE=8", f"{vt}HIDDEN_DIM={width}", f"{vt}NUM_HEADS={heads}",
        f"{vt}NUM_LAYERS=3", f"{vt}MLP_DIM={mlp_dim}", f"{vt}QKV_BIAS={qkv_bias}",
        f"{vt}DROP_PATH_RATE=0", f"{vt}DROPOUT_RATE=0", f"{vt}ATTENTION_DROPOUT_RATE=0",
        "config.MODEL.TRUNK.CONVIT.N_GPSA_LAYERS=2",
        f"config.MODEL.TRUNK.CONVIT.LOCALITY_DIM={LOCALITY_DIM}",
    ])
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


def kmeans_on_ranks(memory: torch.Tensor, clusters: int, world: int, out: Path) -> Dict[str, torch.Tensor]:
    """DeepCluster-v2's distributed k-means (patches._cluster_memory) on `world`
    gloo processes, each holding a consecutive share of `memory`; rank 0's result
    (tests/kmeans_ranks.py)."""
    memory_file = out.with_name(out.name + ".memory.pt")
    torch.save(memory, memory_file)
    script = Path(__file__).with_name("kmeans_ranks.py")
    proc = run_warm([str(script), str(memory_file), str(clusters), str(world), str(out)], cwd=out.parent, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return torch.load(out)
