"""convit_ssl: ConViT (gated positional self-attention) for PyTorch, timm and VISSL.

`import convit_ssl` gives the plain-PyTorch model (`ConViT`, `create_model`,
`list_models`) and changes nothing process-wide; `convit_ssl.checkpoints` and
`convit_ssl.analysis` are plain PyTorch too. The VISSL integration lives in
`convit_ssl.vissl`, which patches and registers VISSL when imported (its entry
points import it: `convit-ssl run`, tools/*).
"""

from convit_ssl.models import ConViT, create_model, list_models

__version__ = "0.1.0"
__all__ = ["ConViT", "create_model", "list_models", "__version__"]
