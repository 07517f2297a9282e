"""The model exported and compiled gives eager's numbers: torch.export (fixed
and dynamic batch; the patch grid is fixed by the image size), ONNX through
torch's exporter run in onnxruntime, torch.compile for a forward (inductor)
and a training step (aot_eager). Tolerances are the measured differences with headroom (fp32,
a 4-block model at 32 px): export 0, ONNX 4e-7, compile 3e-7."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convit_ssl.models import create_model

SMALL = dict(img_size=32, patch_size=8, depth=4, num_gpsa_layers=2, num_classes=5)


def _model():
    torch.manual_seed(0)
    return create_model("convit_tiny", **SMALL).eval()


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_torch_export_fixed_and_dynamic_batch():
    model = _model()
    x = _images(2)
    fixed = torch.export.export(model, (x,)).module()
    assert torch.equal(fixed(x), model(x))
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}}).module()
    for n in (1, 5):
        y = _images(n, seed=n)
        assert (dynamic(y) - model(y)).abs().max().item() <= 1e-6


def test_onnx_in_onnxruntime_matches_eager(tmp_path):
    pytest.importorskip("onnxscript")  # torch's exporter
    ort = pytest.importorskip("onnxruntime")
    model = _model()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.onnx.export(model, (_images(2),), dynamo=True, dynamic_shapes={"x": {0: batch}}, verbose=False)
    path = tmp_path / "convit.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (2, 3):
        x = _images(n, seed=n)
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            assert out.shape == (n, 5)
            assert abs(out - model(x).numpy()).max() <= 2e-6


@torch.no_grad()
def test_compile_forward_with_inductor():
    """torch.compile as users run it (inductor, which generates C++ on the CPU)."""
    model = _model()
    x = _images(4)
    assert (torch.compile(model)(x) - model(x)).abs().max().item() <= 2e-6


def test_compiled_training_step_matches_eager():
    """One training step through torch.compile's graph capture and AOT autograd
    (backend aot_eager: the graphs inductor would lower, run op by op; inductor's
    own backward is minutes of C++ compilation on 2 cores): the loss and every
    gradient equal eager's (drop path and dropout off)."""
    model = _model().train()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = _images(4), torch.arange(4) % 5
    grads = []
    for run in (model, compiled):
        model.zero_grad()
        loss = F.cross_entropy(run(x), y)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager_loss, eager), (compiled_loss, got) = grads
    assert abs(eager_loss - compiled_loss) <= 1e-6
    worst = max((got[n] - g).abs().max().item() / max(1.0, g.abs().max().item()) for n, g in eager.items())
    assert worst <= 1e-5, worst
