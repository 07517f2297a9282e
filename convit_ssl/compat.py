"""Shims that let VISSL 0.1.6 and ClassyVision 0.7.0 run on Python 3.11,
torch 2.x and numpy 2.

`apply()` runs when `convit_ssl` is imported, which must therefore happen
before VISSL, ClassyVision, timm or torchvision are imported. Every shim is
idempotent and does nothing where the thing it restores already exists.
Each names the upstream line it answers. The stack these are tested on is
pinned in constraints.txt (torch 2.14.1 + torchvision 0.29.1, the regular
PyPI builds, need no torchvision shim).
"""

from __future__ import annotations

import collections
import collections.abc
import importlib.metadata
import importlib.util
import sys
import types
from typing import List

# Names restored by each shim, for tests and for `convit-ssl env`.
_APPLIED: List[str] = []


def _pkg_resources_standin() -> types.ModuleType:
    """A minimal `pkg_resources` with the two calls VISSL makes."""
    module = types.ModuleType("pkg_resources")
    module.__doc__ = "convit_ssl stand-in for the pkg_resources removed from setuptools >= 81"

    class DistributionNotFound(ImportError):
        pass

    def resource_filename(package: str, resource: str) -> str:
        import importlib.resources

        return str(importlib.resources.files(package).joinpath(resource))

    def get_distribution(name: str) -> types.SimpleNamespace:
        try:
            return types.SimpleNamespace(project_name=name, version=importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError as e:
            raise DistributionNotFound(name) from e

    module.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
    module.resource_filename = resource_filename  # type: ignore[attr-defined]
    module.get_distribution = get_distribution  # type: ignore[attr-defined]
    return module


def shim_pkg_resources() -> None:
    """vissl/utils/misc.py:16 and vissl/utils/collect_env.py:12 `import pkg_resources`
    (misc.py:233 `pkg_resources.resource_filename("configs", ...)`,
    collect_env.py:125 `pkg_resources.get_distribution("apex")`): setuptools >= 81
    no longer ships pkg_resources."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return
    sys.modules["pkg_resources"] = _pkg_resources_standin()
    _APPLIED.append("pkg_resources")


def shim_numpy_aliases() -> None:
    """numpy >= 1.24 removed the `np.float` / `np.int` aliases used by
    vissl/meters/mean_ap_meter.py:70 (`astype(np.float)`),
    vissl/utils/svm_utils/evaluate.py:43, vissl/utils/instance_retrieval_utils/rmac.py:102
    and classy_vision/dataset/transforms/autoaugment.py:168 (`astype(np.int)`);
    vissl/data/collators/cutmixup_collator.py:372 uses `np.bool` (back in numpy 2)."""
    import numpy as np

    for name, value in (("float", float), ("int", int), ("bool", bool)):
        if name not in np.__dict__:
            setattr(np, name, value)
            _APPLIED.append(f"numpy.{name}")


def shim_collections_abcs() -> None:
    """Python 3.10 removed the ABC aliases from `collections`:
    vissl/utils/misc.py:373 `isinstance(v, collections.MutableMapping)`."""
    for name in ("Mapping", "MutableMapping", "Sequence", "MutableSequence", "Iterable", "Callable"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
            _APPLIED.append(f"collections.{name}")


def _atomic_save_checkpoint(checkpoint_folder, state, checkpoint_file="checkpoint.torch"):
    """ClassyVision's save_checkpoint, written to a temporary file and renamed into place."""
    import torch
    from iopath.common.file_io import g_pathmgr

    from convit_ssl.checkpoints.io import atomic_torch_save

    g_pathmgr.mkdirs(checkpoint_folder)
    full_filename = f"{checkpoint_folder}/{checkpoint_file}"
    if "://" in str(checkpoint_folder):  # remote storage has no rename: upstream behaviour
        with g_pathmgr.open(full_filename, "wb") as f:
            torch.save(state, f)
    else:
        atomic_torch_save(state, full_filename)
    return full_filename


def patch_atomic_checkpoints() -> None:
    """classy_vision/generic/util.py:349 says "write checkpoint atomically" but
    writes the final file in place (and vissl/utils/checkpoint.py:17 imports it):
    a run killed while saving leaves a truncated checkpoint that auto-resume
    then fails to load. Write to a temporary file and rename. Needs ClassyVision,
    so it runs after the import-time shims (VISSL is imported by then)."""
    import classy_vision.generic.util as classy_util

    if getattr(classy_util.save_checkpoint, "__name__", "") == "_atomic_save_checkpoint":
        return
    classy_util.save_checkpoint = _atomic_save_checkpoint
    vissl_checkpoint = sys.modules.get("vissl.utils.checkpoint")
    if vissl_checkpoint is not None:
        vissl_checkpoint.save_checkpoint = _atomic_save_checkpoint
    _APPLIED.append("atomic save_checkpoint")


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, with 0 bits giving the black image older Pillow gave."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def patch_posterize() -> None:
    """vissl/data/ssl_transforms/rand_auto_aug.py:272-275 passes bits_to_keep = 0
    to PIL.ImageOps.posterize (RandAugment with increasing severity at high
    magnitude), which Pillow >= 10 rejects ("bits must be between or equal to 1
    and 8"); Pillow 9 returned a black image. Restore that result."""
    import vissl.data.ssl_transforms.rand_auto_aug as rand_auto_aug

    if rand_auto_aug.posterize is _posterize:
        return
    rand_auto_aug.posterize = _posterize
    for name, op in list(rand_auto_aug.NAME_TO_OP.items()):
        if getattr(op, "__name__", "") == "posterize":
            rand_auto_aug.NAME_TO_OP[name] = _posterize
    _APPLIED.append("RandAugment posterize(0 bits)")


def apply() -> List[str]:
    """Apply every shim (idempotent); return the names restored so far."""
    shim_pkg_resources()
    shim_numpy_aliases()
    shim_collections_abcs()
    return list(_APPLIED)
