"""`convit_ssl.vissl.compat.patches`, the one module that changes VISSL and what it
calls: each patch restores what VISSL uses, is idempotent and a no-op where
the thing exists; the upstream lines it answers run; docs/STACK.md lists the
table. And the other side: a PyTorch user's `import convit_ssl` loads no
VISSL and changes nothing process-wide (fresh interpreters)."""

from __future__ import annotations

import collections
import collections.abc
import importlib.metadata
import importlib.resources
import json
import subprocess
import sys

import numpy as np
import pytest

from convit_ssl.vissl.compat import patches
from helpers import REPO

VISSL_PATCHES = [
    "atomic save_checkpoint",
    "RandAugment posterize(0 bits)",
    "DINOHook teacher without stochastic depth",
    "DeepClusterV2Loss on the task's device",
    "warm-up start kept on request",
    "MoCo queue shared by every rank",
    "disk images read once, as 8-bit RGB",
    "feature extraction on the task's device",
    "ranks and data workers set up as their parent",
    "resume from a preemption checkpoint",
    "no full garbage collection per phase without loader workers",
    "SVM average precision as a scalar",
]


def _fresh(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_table_is_complete_and_idempotent():
    assert len({p.name for p in patches.PATCHES}) == len(patches.PATCHES)
    for patch in patches.PATCHES:
        assert patch.target and patch.upstream and patch.why, patch.name
        assert patch.apply() is False, f"{patch.name}: a second application changed something"
    assert patches.apply() == patches.applied()
    assert set(VISSL_PATCHES) <= set(patches.applied())


def test_a_dataset_pickle_sets_vissl_up_before_loading_its_class():
    """A data-loader worker unpickles the dataset in a fresh interpreter: its
    pickle names convit_ssl.vissl before VISSL's dataset class, and round-trips."""
    import pickle

    from vissl.data.ssl_dataset import GenericSSLDataset

    dataset = GenericSSLDataset.__new__(GenericSSLDataset)
    dataset.split, dataset.data_paths = "train", [["/data/train"]]
    payload = pickle.dumps(dataset)
    assert 0 <= payload.find(b"convit_ssl.vissl.run.ranks") < payload.find(b"vissl.data.ssl_dataset")
    copy = pickle.loads(payload)
    assert type(copy) is GenericSSLDataset and copy.__dict__ == dataset.__dict__


def test_the_stack_doc_lists_the_table():
    assert patches.markdown_table() in (REPO / "docs" / "STACK.md").read_text()


def test_pkg_resources_standin_calls():
    module = patches._pkg_resources_standin()
    path = module.resource_filename("configs", "config/dataset_catalog.json")
    assert path.endswith("configs/config/dataset_catalog.json")
    assert module.get_distribution("torch").version == importlib.metadata.version("torch")
    with pytest.raises(module.DistributionNotFound):
        module.get_distribution("surely-not-installed-package-xyz")
    assert issubclass(module.DistributionNotFound, ImportError)  # VISSL catches ImportError


def test_pkg_resources_standin_resources_of_vissl_test_suite(tmp_path, monkeypatch):
    """The calls VISSL's own tests make: listing the installed config tree, and
    the folder beside a plain (non-package) test module."""
    module = patches._pkg_resources_standin()
    configs_root = importlib.resources.files("configs")
    assert module.resource_isdir("configs", "config/test")
    assert not module.resource_isdir("configs", "config/test/no_such_folder")
    assert module.resource_listdir("configs", "config/test") == sorted(
        p.name for p in configs_root.joinpath("config/test").iterdir()
    )
    a_file = next(p for p in configs_root.joinpath("config/test/cpu_test").iterdir() if p.name.endswith(".yaml"))
    assert module.resource_exists("configs", f"config/test/cpu_test/{a_file.name}")
    assert not module.resource_exists("configs", "config/no_such_file.yaml")
    (tmp_path / "plain_test_module.py").write_text("X = 1\n")
    (tmp_path / "test_data").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module.resource_filename("plain_test_module", "test_data") == str(tmp_path / "test_data")


def test_pkg_resources_shim_is_noop_when_present(monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "pkg_resources", sentinel)
    assert patches.shim_pkg_resources() is False
    assert sys.modules["pkg_resources"] is sentinel


def test_numpy_aliases():
    assert np.float is float and np.int is int
    assert np.zeros(2, dtype=np.bool).dtype == np.bool_


def test_numpy_shim_keeps_existing(monkeypatch):
    sentinel = type("Sentinel", (), {})
    monkeypatch.setattr(np, "float", sentinel, raising=False)
    patches.shim_numpy_aliases()
    assert np.float is sentinel


def test_collections_aliases():
    assert collections.MutableMapping is collections.abc.MutableMapping


def test_upstream_lines_run():
    from vissl.utils.misc import flatten_dict, get_json_data_catalog_file

    assert flatten_dict({"a": {"b": 1}}) == {"a_b": 1}  # misc.py: collections.MutableMapping
    assert get_json_data_catalog_file().endswith("dataset_catalog.json")  # misc.py: pkg_resources
    import classy_vision.dataset.transforms.autoaugment  # noqa: F401  (np.int at import)
    from vissl.utils.svm_utils.evaluate import calculate_ap, get_precision_recall

    precision, recall, _, _ = get_precision_recall(np.array([1, -1, 1, -1]), np.array([0.9, 0.8, 0.3, 0.1]))
    assert precision[0] == 1.0 and recall[-1] == 1.0  # evaluate.py:43 np.float
    ap = calculate_ap(recall, precision)
    assert isinstance(ap, float)
    matrix = np.zeros((1, 1))
    matrix[0][0] = ap  # what numpy >= 2.4 refuses for a 1-element array


def test_vissl_trunk_registered():
    from vissl.models.trunks import MODEL_TRUNKS_REGISTRY

    from convit_ssl.vissl import ConViTSSLTrunk, register

    register()  # idempotent
    assert MODEL_TRUNKS_REGISTRY["convit_ssl"] is ConViTSSLTrunk
    assert MODEL_TRUNKS_REGISTRY["convit"] is not ConViTSSLTrunk  # VISSL's own stays


def test_checkpoint_save_is_atomic(tmp_path):
    import classy_vision.generic.util as classy_util
    import torch
    import vissl.utils.checkpoint as vissl_checkpoint

    assert vissl_checkpoint.save_checkpoint is classy_util.save_checkpoint
    save = vissl_checkpoint.save_checkpoint
    save(str(tmp_path), {"x": torch.ones(3)}, "ok.torch")
    assert torch.load(tmp_path / "ok.torch", weights_only=True)["x"].sum() == 3

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    (tmp_path / "old.torch").write_bytes(b"previous checkpoint")
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save(str(tmp_path), {"x": torch.ones(3), "bad": Unpicklable()}, "old.torch")
    assert (tmp_path / "old.torch").read_bytes() == b"previous checkpoint"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.torch", "old.torch"]  # no partial file


def test_randaugment_posterize_zero_bits():
    """VISSL's RandAugment (increasing severity) asks for 0 bits; Pillow >= 10 refuses."""
    from PIL import Image
    from vissl.data.ssl_transforms.rand_auto_aug import NAME_TO_OP

    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert list(NAME_TO_OP["PosterizeIncreasing"](img, 0).getdata())[0] == (0, 0, 0)
    assert list(NAME_TO_OP["PosterizeIncreasing"](img, 4).getdata())[0] == (192, 96, 48)
    assert NAME_TO_OP["Posterize"](img, 8) is img


PURE_IMPORT = """
import collections, json, sys, warnings
import numpy as np
import torch
filters = list(warnings.filters)  # after torch, which adds its own
import convit_ssl, convit_ssl.models, convit_ssl.checkpoints, convit_ssl.analysis, convit_ssl.cli.convert
m = convit_ssl.create_model("convit_tiny", img_size=32, patch_size=8, depth=2, num_gpsa_layers=1)
roots = sorted({name.split(".")[0] for name in sys.modules})
print(json.dumps({"roots": roots, "np_float": "float" in np.__dict__, "mapping": hasattr(collections, "Mapping"),
                  "pkg_resources": getattr(sys.modules.get("pkg_resources"), "__doc__", None),
                  "filters_unchanged": warnings.filters == filters}))
"""


def test_pure_pytorch_import_loads_no_vissl_and_changes_nothing():
    """A PyTorch / timm user's import: no VISSL, ClassyVision, Hydra or stand-in
    module, no numpy or collections alias, warning filters untouched."""
    state = json.loads(_fresh(PURE_IMPORT).stdout.strip().splitlines()[-1])
    assert not {"vissl", "classy_vision", "hydra", "fvcore", "submitit", "timm", "matplotlib"} & set(state["roots"])
    assert state["pkg_resources"] is None or "convit_ssl" not in state["pkg_resources"]
    assert state == {**state, "np_float": False, "mapping": False, "filters_unchanged": True}


def test_importing_the_vissl_package_sets_vissl_up():
    """...and leaves scikit-learn unloaded until the low-shot benchmark asks for
    VISSL's low-shot trainer (patches.low_shot_trainer), patched."""
    code = (
        "import convit_ssl.vissl, sys\n"
        "from convit_ssl.vissl.compat import patches, upstream\n"
        "from vissl.models.trunks import MODEL_TRUNKS_REGISTRY\n"
        "from classy_vision.tasks import TASK_REGISTRY\n"
        "print(patches.applied()); print('convit_ssl' in MODEL_TRUNKS_REGISTRY, 'convit_ssl_task' in TASK_REGISTRY)\n"
        "print('sklearn' in sys.modules)\n"
        "SVMLowShotTrainer = patches.low_shot_trainer()\n"
        "print('sklearn' in sys.modules, SVMLowShotTrainer.test is upstream.low_shot_test)\n"
    )
    lines = _fresh(code).stdout.strip().splitlines()
    assert set(VISSL_PATCHES) <= set(eval(lines[-4])) and lines[-3] == "True True"
    assert lines[-2:] == ["False", "True True"]


def _odd_images(folder):
    """RGBA, palette, 16-bit and 8-bit greyscale PNGs of one gradient, and its 8-bit RGB reference."""
    from PIL import Image

    gradient = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 32 x 32, 0..248
    rgb = np.stack([gradient, gradient[::-1], np.full_like(gradient, 100)], axis=-1)
    folder.mkdir(parents=True)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full_like(gradient, 7)])).save(folder / "rgba.png")
    Image.fromarray(rgb).quantize(256, dither=Image.Dither.NONE).save(folder / "palette.png")
    Image.fromarray(gradient.astype(np.uint16) * 257).save(folder / "grey16.png")  # 0..63736, I;16
    Image.fromarray(gradient).save(folder / "grey8.png")
    return rgb, gradient


@pytest.mark.parametrize("source", ["disk_folder", "disk_filelist"])
def test_vissl_reads_rgba_palette_and_16_bit_images_as_8_bit_rgb(source, tmp_path):
    """Through VISSL's own dataset: alpha dropped, the palette expanded, and a
    16-bit image scaled to 8 bits (PIL's convert('RGB') clips it to white)."""
    from PIL import Image
    from vissl.data.disk_dataset import DiskImageDataset

    from convit_ssl.vissl.configs import compose

    rgb, gradient = _odd_images(tmp_path / "images" / "odd")
    _, cfg = compose(["config=test/convit_ssl/supervised_micro_folder"])
    if source == "disk_folder":
        path = str(tmp_path / "images")
    else:
        path = str(tmp_path / "images.npy")
        np.save(path, np.array(sorted(str(p) for p in (tmp_path / "images" / "odd").iterdir())))
    dataset = DiskImageDataset(cfg, source, path, "TRAIN", "odd")
    images = {}
    for i in range(len(dataset)):
        image, valid = dataset[i]
        assert valid and image.mode == "RGB"
        images[len(images)] = np.asarray(image)
    by_name = dict(zip(["grey16", "grey8", "palette", "rgb", "rgba"], images.values()))  # sorted file names
    assert np.array_equal(by_name["rgb"], rgb) and np.array_equal(by_name["rgba"], rgb)
    assert np.abs(by_name["palette"].astype(int) - rgb).max() <= 8  # quantised to 256 colours
    grey = np.repeat(gradient[..., None], 3, axis=-1)
    assert np.array_equal(by_name["grey8"], grey)
    assert np.array_equal(by_name["grey16"], grey)  # (v * 257) >> 8 == v
    assert Image.open(tmp_path / "images" / "odd" / "grey16.png").mode == "I;16"


def test_upstream_copies_name_the_lines_they_copy():
    """Each method convit_ssl replaces whole names the upstream function it copies
    (file:first-last lines, checked against the installed VISSL) and what differs."""
    import ast
    import inspect
    import re
    from pathlib import Path

    import vissl

    from convit_ssl.vissl.compat import upstream

    copies = [f for _, f in inspect.getmembers(upstream, inspect.isfunction) if f.__module__ == upstream.__name__]
    assert len(copies) == 8
    for function in copies:
        doc = inspect.getdoc(function)
        match = re.search(r"Upstream: vissl/([\w/]+\.py):(\d+)-(\d+) \(\w+\.(\w+)\)\. Differs from upstream: \S", doc)
        assert match, f"{function.__name__}: {doc}"
        path, first, last, name = match.groups()
        tree = ast.parse((Path(vissl.__file__).parent / path).read_text())
        found = [(n.lineno, n.end_lineno) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name]
        assert (int(first), int(last)) in found, (function.__name__, found)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_phase_change_collects_garbage_only_for_loader_workers(workers, monkeypatch):
    """VISSL's phase change: the sampler gets its epoch and the new iterator reads
    the loader; the full collection (0.15 s each) only where worker processes
    are there to shut down."""
    import gc
    import types

    from vissl.trainer.train_task import SelfSupervisionTask

    collections_run = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections_run.append(1) or 0)
    task = SelfSupervisionTask.__new__(SelfSupervisionTask)
    epochs = []
    task.config = _Config(SEED_VALUE=0, DATA=_Config(NUM_DATALOADER_WORKERS=workers))
    task.datasets = {"train": types.SimpleNamespace(rebuild_dataloader=lambda: False)}
    task.dataloaders = {"train": [1, 2, 3]}
    task.data_iterator = iter([])
    task.set_epoch = lambda phase, epoch, start, train_phase: epochs.append((phase, epoch, start))
    task.recreate_data_iterator("train", epoch=4, compute_start_iter=False, train_phase_idx=2)
    assert epochs == [("train", 4, 0)] and list(task.data_iterator) == [1, 2, 3]
    assert len(collections_run) == (1 if workers else 0)


class _Config(dict):
    """VISSL's AttrDict: keys as items and as attributes."""

    __getattr__ = dict.__getitem__
