"""The README's code for PyTorch and timm users runs as written."""

from __future__ import annotations

import re

from helpers import REPO


def _python_blocks(section: str):
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_the_pytorch_section_runs(tmp_path, monkeypatch):
    blocks = _python_blocks("The model in plain PyTorch")
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)  # where it writes convit_tiny.onnx
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    model = namespace["model"]
    assert namespace["logits"].shape == (2, 10)
    assert namespace["tokens"].shape == (2, 1 + 10 * 12, 192)
    assert [m.shape for m in namespace["maps"]] == [(2, 192, 10, 12)] * 2
    assert model.get_classifier().out_features == 5
    assert len(namespace["optimizer"].param_groups) == 2 * (12 + 2)  # layer decay: stem, 12 blocks, norm/head
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession("convit_tiny.onnx", providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    assert abs(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] - expected).max() <= 1e-5
    assert callable(namespace["program"].module()) and callable(namespace["compiled"])
