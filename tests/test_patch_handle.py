"""pyops.patch handle behaviour: the op backend reaches every route, remove() order and
restoration after the model moved, compile with an attention fallback, report notes."""
from __future__ import annotations

import warnings

import pytest
import torch

import pyops

pytest.importorskip("diffusers")
from test_patch import TINY, _call, _dit, _flux, _hunyuan  # noqa: E402


def test_backend_reaches_dispatcher_attention_and_cache(monkeypatch):
    """The registered diffusers backend hands PatchConfig.backend (None: auto) to the pyops
    attention route, and the cache gets it too."""
    import pyops.patch.attention as pa
    seen = []
    orig = pa.diffusers_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("backend"))
        return orig(*args, **kwargs)
    monkeypatch.setattr(pa, "diffusers_attention", spy)
    m, kw = _flux(torch.bfloat16)
    cache = pyops.CacheConfig(level="step", threshold=0.0, num_steps=2)
    h = pyops.patch(m, pyops.PatchConfig(linear=None, attention="int8", backend="reference",
                                         cache=cache))
    assert {r for _, r in h.report.attention} == {"diffusers backend pyops_int8_reference"}
    _call(m, kw)
    assert seen and set(seen) == {"reference"}
    assert h.cache.config.backend == "reference" and cache.backend is None
    h.remove()
    seen.clear()
    h = pyops.patch(m, pyops.PatchConfig(linear=None, attention="int8"))
    assert {r for _, r in h.report.attention} == {"diffusers backend pyops_int8"}
    _call(m, kw)
    assert set(seen) == {None}
    h.remove()
    with pytest.raises(ValueError, match="backend"):
        pyops.patch.backend_name("int8", "cudnn")


def test_remove_refuses_when_wrapped_after_patch():
    """pyops.cache_model applied separately on a patched model: removing the patch first is
    refused before anything changes; in the right order both come off cleanly."""
    m, kw = _dit(torch.float32)
    ref = _call(m, kw)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, attention=None))
    patched = _call(m, kw)
    cached = pyops.cache_model(m, pyops.CacheConfig(level="step", threshold=0.0, num_steps=4))
    with pytest.raises(RuntimeError, match="wrapped after patch"):
        h.remove()
    assert torch.equal(_call(m, kw), patched)  # nothing was changed
    cached.remove()
    h.remove()
    assert torch.equal(_call(m, kw), ref)
    assert not any("forward" in vars(x) or "_pyops_backend" in vars(x) for x in m.modules())


def test_remove_follows_a_cast_and_move_after_patch():
    m, kw = _dit(torch.bfloat16)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, attention=None))
    m.half()
    h.remove()
    dts = {p.dtype for p in m.parameters()}
    assert dts == {torch.float16}, dts
    _call(m, kw)  # no dtype mismatch


def test_compile_fullgraph_with_attention_fallback():
    """HunyuanVideo always passes a mask, so its attention takes the SDPA fallback: compiling
    before any eager call must not trip on the fallback's warning."""
    import pyops.ops.attention as oa
    oa._WARNED.clear()
    m, kw = _hunyuan(torch.bfloat16)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, attention="int8"))
    assert all("falls back" in r for _, r in h.report.attention), h.report.attention
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _call(cm, kw)
        eager = _call(m, kw)
    assert torch.equal(out, eager)
    h.remove()


def test_report_says_fusion_needs_fp8():
    m, _ = _dit(torch.float32)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, linear="nvfp4", attention=None))
    assert "fuse needs linear='fp8'" in str(h.report)
    assert not h.report.blocks
    h.remove()


def test_sampler_accepts_a_compiled_model():
    m, _ = _dit(torch.float32)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, attention=None, sampler="flux-schnell"))
    calls = []

    def wrapper(x, t, **cond):
        calls.append(1)
        return m(x, t, **cond)
    s = h.sampler(model=wrapper)
    with torch.no_grad():
        s.sample((1, 16, 8), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4
    h.remove()
