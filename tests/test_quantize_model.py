"""pyops.nn: QuantLinear, quantize_model's skip policy and overrides, state-dict round trip, and
the embedded DiT quantized end to end (CPU: the reference backends)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import pyops
from pyops.qlinear import linear, quantize_weight
from pyops.models.dit import DiT, DiTConfig
from pyops.nn import QuantConfig, QuantLinear, quantize_model

CFG = DiTConfig(hidden=1024, depth=2, heads=8, in_channels=16)
BLOCK_LINEARS = {f"blocks.{i}.{n}" for i in range(2) for n in ("qkv", "proj", "fc1", "fc2")}


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    m = DiT.random(CFG, seed=0).eval()
    x = torch.randn(2, 48, CFG.in_channels)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = m(x, t)
        # what the quantized layers contribute: the output moves this much without them
        bare = copy.deepcopy(m)
        for n in BLOCK_LINEARS:
            if n.endswith(("proj", "fc2")):
                bare.get_submodule(n).weight.zero_()
        contrib = float((m(x, t) - bare(x, t)).norm())
    return m, x, t, ref, contrib


def test_default_skip_policy(dit):
    m = copy.deepcopy(dit[0])
    r = quantize_model(m, "fp8")
    assert {d.name for d in r.quantized} == BLOCK_LINEARS
    why = {d.name: d.reason for d in r.skipped}
    assert why["x_embedder"] == "skip: embedder" and why["t_embedder.0"] == "skip: embedder"
    assert why["t_embedder.2"] == "skip: embedder"
    assert why["blocks.0.adaLN_modulation"] == "skip: adaLN modulation"
    assert why["adaLN_out"] == "skip: adaLN modulation"
    assert why["proj_out"] == "skip: final projection"
    for n in BLOCK_LINEARS:
        assert isinstance(m.get_submodule(n), QuantLinear)
    assert type(m.get_submodule("blocks.0.adaLN_modulation")) is nn.Linear
    s = str(r)
    assert "8 quantized, 7 kept" in s and "blocks.1.fc2" in s


def test_min_dim_and_overrides():
    net = nn.Sequential()
    net.add_module("small", nn.Linear(512, 2048))
    net.add_module("big", nn.Linear(2048, 1024))
    net.add_module("big2", nn.Linear(1024, 1024))
    net.add_module("x_embedder", nn.Linear(1024, 1024))
    r = quantize_model(copy.deepcopy(net), "fp8")
    assert r.decision("small").reason == "skip: dimension < 1024"
    assert r.decision("big").format == "fp8" and r.decision("x_embedder").format is None
    cfg = QuantConfig("fp8", overrides=[(r"^big2$", None), (r"embed", "nvfp4"),
                                        (lambda n, mod: mod.in_features == 512, "nvfp4")])
    m = copy.deepcopy(net)
    r = quantize_model(m, cfg)
    assert r.decision("big2").format is None and "override" in r.decision("big2").reason
    assert r.decision("x_embedder").format == "nvfp4"
    assert r.decision("small").format == "nvfp4"
    assert m.small.format == "nvfp4" and m.big.format == "fp8"
    r = quantize_model(copy.deepcopy(net), {"format": "nvfp4", "min_dim": 0,
                                            "default_skip": False})
    assert len(r.quantized) == 4
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize_model(copy.deepcopy(net), "int3")
    with pytest.raises(TypeError):
        quantize_model(net, 8)


@pytest.mark.parametrize("fmt,max_rel", [("fp8", 0.1), ("nvfp4", 0.25)])
def test_quantized_dit_close_to_fp32(dit, fmt, max_rel):
    """Error relative to what the quantized layers contribute (a residual stream hides a broken
    layer from a plain output cosine). Measured on CPU: FP8 0.049, NVFP4 0.145; one block with
    its channel scales flipped: 0.35."""
    m, x, t, ref, contrib = dit
    q = copy.deepcopy(m)
    quantize_model(q, fmt)
    with torch.no_grad():
        out = q(x, t)
    rel = float((out - ref).norm()) / contrib
    assert rel < max_rel, rel
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999


def test_broken_path_is_caught(dit):
    """Sanity of the metric above: a weight with the wrong channel order fails it."""
    m, x, t, ref, contrib = dit
    q = copy.deepcopy(m)
    quantize_model(q, "fp8")
    lin = q.get_submodule("blocks.0.fc2")
    lin.weight_scale = lin.weight_scale.flip(0)
    with torch.no_grad():
        rel = float((q(x, t) - ref).norm()) / contrib
    assert rel > 0.25  # above both thresholds of the test above


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_state_dict_round_trip(dit, fmt):
    m, x, t, _, _ = dit
    q = copy.deepcopy(m)
    quantize_model(q, fmt)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = DiT.random(CFG, seed=1).eval()  # other weights: all must come from the file
    quantize_model(fresh, fmt)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(fresh(x, t), q(x, t))
    other = DiT.random(CFG, seed=1).eval()
    quantize_model(other, "nvfp4" if fmt == "fp8" else "fp8")
    with pytest.raises((ValueError, RuntimeError)):
        other.load_state_dict(sd)


def test_quant_linear_module():
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    for fmt in ("fp8", "nvfp4"):
        q = QuantLinear.from_linear(lin, fmt)
        x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
        qw = quantize_weight(lin.weight, fmt)
        assert torch.equal(q(x), linear(x, qw, lin.bias))
        assert f"format={fmt}" in repr(q)
        wdt = q.weight.dtype
        q.to(torch.float16)  # moves, never re-casts the packed weight or its scales
        assert q.weight.dtype == wdt and q.weight_scale.dtype == qw.tensors()[
            "scale" if fmt == "fp8" else "scales"].dtype
        assert q.bias.dtype == torch.float16
        assert q(x.half()).dtype == torch.float16
