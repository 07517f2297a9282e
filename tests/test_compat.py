"""Each compatibility shim: restores what VISSL/ClassyVision use, is a no-op
where the thing exists, and is idempotent; the upstream lines it answers run."""

from __future__ import annotations

import collections
import collections.abc
import importlib.metadata
import sys

import numpy as np
import pytest

from convit_ssl import compat


def test_apply_is_idempotent():
    first = compat.apply()
    second = compat.apply()
    assert first == second
    assert len(second) == len(set(second))


def test_pkg_resources_standin_calls():
    module = compat._pkg_resources_standin()
    path = module.resource_filename("configs", "config/dataset_catalog.json")
    assert path.endswith("configs/config/dataset_catalog.json")
    assert module.get_distribution("torch").version == importlib.metadata.version("torch")
    with pytest.raises(module.DistributionNotFound):
        module.get_distribution("surely-not-installed-package-xyz")
    assert issubclass(module.DistributionNotFound, ImportError)  # VISSL catches ImportError


def test_pkg_resources_shim_is_noop_when_present(monkeypatch):
    sentinel = object()
    monkeypatch.setitem(sys.modules, "pkg_resources", sentinel)
    compat.shim_pkg_resources()
    assert sys.modules["pkg_resources"] is sentinel


def test_numpy_aliases():
    assert np.float is float and np.int is int
    assert np.zeros(2, dtype=np.bool).dtype == np.bool_


def test_numpy_shim_keeps_existing(monkeypatch):
    sentinel = type("Sentinel", (), {})
    monkeypatch.setattr(np, "float", sentinel, raising=False)
    compat.shim_numpy_aliases()
    assert np.float is sentinel


def test_collections_aliases():
    assert collections.MutableMapping is collections.abc.MutableMapping


def test_upstream_lines_run():
    from vissl.utils.misc import flatten_dict, get_json_data_catalog_file

    assert flatten_dict({"a": {"b": 1}}) == {"a_b": 1}  # misc.py: collections.MutableMapping
    assert get_json_data_catalog_file().endswith("dataset_catalog.json")  # misc.py: pkg_resources
    import classy_vision.dataset.transforms.autoaugment  # noqa: F401  (np.int at import)
    from vissl.utils.svm_utils.evaluate import get_precision_recall

    precision, recall, _, _ = get_precision_recall(np.array([1, -1, 1, -1]), np.array([0.9, 0.8, 0.3, 0.1]))
    assert precision[0] == 1.0 and recall[-1] == 1.0  # evaluate.py:43 np.float


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
