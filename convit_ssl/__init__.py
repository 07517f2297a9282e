"""convit_ssl: ConViT trunks for VISSL on today's stack.

Importing the package applies the compatibility shims (which must precede any
VISSL, ClassyVision, timm or torchvision import) and, where VISSL is
installed, registers the `convit_ssl` trunk. `convit_ssl.models` is plain
PyTorch and usable without VISSL.
"""

import importlib.util

from convit_ssl import compat

compat.apply()

from convit_ssl.models import ConViT, create_model, list_models  # noqa: E402

if importlib.util.find_spec("vissl") is not None:
    from convit_ssl.vissl import register as _register_vissl

    _register_vissl()
    compat.patch_atomic_checkpoints()
    compat.patch_posterize()

__version__ = "0.1.0"
__all__ = ["ConViT", "create_model", "list_models", "__version__"]
