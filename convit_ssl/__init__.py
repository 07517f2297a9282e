"""convit_ssl: ConViT (gated positional self-attention) for PyTorch, timm and VISSL.

`import convit_ssl` gives the plain-PyTorch model (`ConViT`, `create_model`,
`list_models`), `load_model` (a ConViT from any checkpoint source: a VISSL
run or checkpoint, a timm file or hub folder, the official release, a DeiT,
VISSL's built-in convit) and changes nothing process-wide; `convit_ssl.checkpoints` and
`convit_ssl.analysis` are plain PyTorch too. The VISSL integration lives in
`convit_ssl.vissl`, which patches and registers VISSL when imported (its entry
points import it: `convit-ssl run`, tools/*).
"""

from convit_ssl.checkpoints.loader import load_model
from convit_ssl.models import ConViT, create_model, list_models

__version__ = "0.1.0"
__all__ = ["ConViT", "create_model", "list_models", "load_model", "__version__"]
