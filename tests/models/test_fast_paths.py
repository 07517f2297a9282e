"""The speed features keep results unchanged: activation checkpointing,
torch.compile, bf16 autocast, and no process-wide torch settings touched.

(Speed itself is measured by `tools/benchmark.py`, never in a test.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from convit_ssl.models import create_model
from convit_ssl.vissl.model.trunk import named_features

SMALL = dict(img_size=(32, 48), patch_size=8, depth=4, num_gpsa_layers=2, num_classes=5)


def _trained_looking(seed: int = 0, **overrides):
    """A small ConViT on a non-square grid whose weights moved away from the init."""
    torch.manual_seed(seed)
    model = create_model("convit_tiny", **{**SMALL, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _outputs_and_grads(model, x, seed: int = 3, run=None):
    """Output of `run` (default: the model) on x and the gradients it leaves in the model."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = (model if run is None else run)(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_bytes(model, x) -> int:
    """Bytes autograd keeps for the backward pass of one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


# ------------------------------------------------------------ checkpointing
def test_grad_checkpointing_gives_identical_outputs_and_gradients():
    """With drop path and dropout active: recomputation replays the same random
    masks, so outputs and every gradient are bit-identical."""
    model = _trained_looking(drop_path_rate=0.3, proj_drop_rate=0.1).train()
    x = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    out_plain, grads_plain = _outputs_and_grads(model, x)
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = _outputs_and_grads(model, x)
    assert torch.equal(out_plain, out_ckpt)
    for name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=0, atol=1e-7), name


def test_grad_checkpointing_keeps_less_for_backward():
    model = _trained_looking().train()
    x = torch.randn(4, 3, 32, 48)
    plain = _saved_bytes(model, x)
    model.set_grad_checkpointing(True)
    checkpointed = _saved_bytes(model, x)
    assert checkpointed < 0.3 * plain, (checkpointed, plain)


def test_vissl_trunk_honours_activation_checkpointing_config():
    from convit_ssl.vissl.model.trunk import ConViTSSLTrunk

    block = {"ARCH": "convit_tiny", "IMAGE_SIZE": 32, "PATCH_SIZE": 8, "DEPTH": 3, "NUM_GPSA_LAYERS": 1}
    off = ConViTSSLTrunk({"TRUNK": {"CONVIT_SSL": block}}, "t")
    on = ConViTSSLTrunk(
        {"TRUNK": {"CONVIT_SSL": block}, "ACTIVATION_CHECKPOINTING": {"USE_ACTIVATION_CHECKPOINTING": True}}, "t"
    )
    assert (off.grad_checkpointing, on.grad_checkpointing) == (False, True)
    on.load_state_dict(off.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert _saved_bytes(lambda t: on(t, ["lastCLS", "concatPOOL2"])[0], x) < _saved_bytes(
        lambda t: off(t, ["lastCLS", "concatPOOL2"])[0], x
    )
    torch.testing.assert_close(on(x, ["concatPOOL2"])[0], off(x, ["concatPOOL2"])[0], rtol=0, atol=0)


# ------------------------------------------------------------------ compile
@pytest.mark.slow
def test_torch_compile_has_no_graph_breaks_and_matches_eager():
    """One graph for the whole forward (training and named features alike), and the
    compiled model (inductor) gives eager's outputs and gradients."""
    import torch._dynamo

    model = _trained_looking().train()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    for fn in (model, lambda t: named_features(model, t, ["concatCLS2", "lastMAP"])):
        explained = torch._dynamo.explain(fn)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    eager_out, eager_grads = _outputs_and_grads(model.eval(), x)
    compiled = torch.compile(model, fullgraph=True)
    out, grads = _outputs_and_grads(model, x, run=compiled)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------- bf16
@pytest.mark.parametrize("attn_drop", [0.0, 0.1], ids=["fused", "explicit"])
def test_bf16_autocast_forward_and_backward(attn_drop):
    model = _trained_looking(attn_drop_rate=attn_drop).eval()
    x = torch.randn(4, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() <= 0.02 * reference.abs().max() + 1e-3
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_half_precision_on_cpu_uses_the_explicit_product(monkeypatch):
    """bf16 on the CPU computes softmax(QK^T/sqrt(d))V explicitly (faster there
    than SDPA's CPU kernel) with SDPA's numbers; fp32 and dropout keep SDPA."""
    import torch.nn.functional as F

    from convit_ssl.models.attention import softmax_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 35, 16, generator=g) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v)
    sdpa_calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(a[0].dtype) or original(*a, **kw)
    )
    half = softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert half.dtype == torch.bfloat16 and sdpa_calls == []
    assert (half.float() - reference).abs().max() <= 0.03
    assert (half.float() - original(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()).abs().max() <= 0.03
    torch.testing.assert_close(softmax_attention(q, k, v), reference)
    softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), dropout_p=0.1)
    assert sdpa_calls == [torch.float32, torch.bfloat16]


# ------------------------------------------------------- no global effects
GLOBAL_STATE = """
import json, torch
def state():
    return {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "denormals_kept": bool((torch.tensor([1e-40]) * 1.0).item() != 0.0),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "grad_enabled": torch.is_grad_enabled(),
        "default_dtype": str(torch.get_default_dtype()),
        "mkldnn": torch.backends.mkldnn.enabled,
    }
before = state()
import convit_ssl.vissl  # noqa: F401
from convit_ssl.models import create_model
from convit_ssl.vissl.model.trunk import named_features
from convit_ssl.vissl.model.trunk import ConViTSSLTrunk
m = create_model("convit_tiny", img_size=32, patch_size=8, depth=3, num_gpsa_layers=2, num_classes=3)
m(torch.randn(2, 3, 32, 32)).sum().backward()
with torch.inference_mode():
    m.eval()(torch.randn(2, 3, 32, 32))
t = ConViTSSLTrunk({"TRUNK": {"CONVIT_SSL": {"ARCH": "convit_tiny", "IMAGE_SIZE": 32, "PATCH_SIZE": 8,
                                             "DEPTH": 2, "NUM_GPSA_LAYERS": 1}}}, "t")
t(torch.randn(1, 3, 32, 32), ["lastCLS"])
print(json.dumps([before, state()]))
"""


def test_library_leaves_process_wide_torch_settings_alone():
    """Importing convit_ssl (and VISSL through it) and running the model and the
    trunk changes no thread count, denormal mode, precision or autograd setting."""
    out = subprocess.run([sys.executable, "-c", GLOBAL_STATE], capture_output=True, text=True, check=True)
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before["denormals_kept"], before
    assert after == before
