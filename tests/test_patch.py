"""pyops.patch on tiny diffusers Flux / SD3 / Wan / HunyuanVideo transformers and the embedded DiT
(CPU: reference backends, i.e. the quantized arithmetic of every op simulated in fp32)."""
from __future__ import annotations

import collections
import re
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyops
from pyops.patch import blocks as B
from pyops.patch.attention import backend_name

diffusers = pytest.importorskip("diffusers")

ALL_ON = dict(linear="fp8", attention="int8", fuse=True)
TINY = pyops.QuantConfig(min_dim=0)  # tiny models: quantize every block linear


def _flux(dtype):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                               attention_head_dim=16, num_attention_heads=2,
                               joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(4, 4, 8)).to(dtype).eval()
    T, L = 6, 16
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, L, 8, generator=g),
              encoder_hidden_states=torch.randn(1, T, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g),
              timestep=torch.tensor([0.7]), txt_ids=torch.zeros(T, 3),
              img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0),
                                                 torch.arange(4.0), indexing="ij"),
                                  -1).reshape(L, 3))
    return m, kw


def _sd3(dtype):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                              attention_head_dim=8, num_attention_heads=2,
                              joint_attention_dim=32, caption_projection_dim=16,
                              pooled_projection_dim=16, out_channels=4,
                              pos_embed_max_size=16).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
              pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500.0]))
    return m, kw


def _wan(dtype, cross_attn_norm=True):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                              in_channels=4, out_channels=4, text_dim=16, freq_dim=32,
                              ffn_dim=32, num_layers=2, cross_attn_norm=cross_attn_norm,
                              rope_max_seq_len=32).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
              timestep=torch.tensor([500.0]))
    return m, kw


def _hunyuan(dtype):
    from diffusers import HunyuanVideoTransformer3DModel
    torch.manual_seed(0)
    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                       attention_head_dim=8, num_layers=1, num_single_layers=1,
                                       num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                       guidance_embeds=True, text_embed_dim=16,
                                       pooled_projection_dim=8,
                                       rope_axes_dim=(2, 2, 4)).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 4, 1, 4, 4, generator=g),
              timestep=torch.tensor([500.0]),
              encoder_hidden_states=torch.randn(1, 6, 16, generator=g),
              encoder_attention_mask=torch.ones(1, 6), pooled_projections=torch.randn(1, 8,
                                                                                        generator=g),
              guidance=torch.tensor([3500.0]))
    return m, kw


def _dit(dtype):
    from pyops.models.dit import DiT, DiTConfig
    m = DiT.random(DiTConfig(hidden=64, depth=2, heads=2, in_channels=8), seed=0).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    return m, dict(x=torch.randn(2, 16, 8, generator=g), t=torch.tensor([0.3, 0.8]))


MODELS = {"flux": _flux, "sd3": _sd3, "wan": _wan, "hunyuan": _hunyuan, "dit": _dit}
# (fused blocks, attention route) expected per model
# (HunyuanVideo's token refiner still uses diffusers' legacy AttnProcessor2_0: SDPA override)
EXPECT = {"flux": (4, ("diffusers backend",)), "sd3": (2, ("sdpa override",)),
          "wan": (2, ("diffusers backend",)),
          "hunyuan": (1, ("diffusers backend", "sdpa override")),
          "dit": (2, ("sdpa override",))}


# branches of the fused forwards that the five models above do not take
def _wan_ti2v(dtype):
    """Wan 2.2 TI2V: a timestep per token, (B, S); WanTransformer3DModel's expand-timesteps
    path gives the blocks a 4-D temb (B, S, 6, D) (diffusers 0.42 transformer_wan.py), so each
    token gets its own shift/scale."""
    m, kw = _wan(dtype)
    S = 2 * 4 * 4  # frames x (8/2) x (8/2) tokens after the (1, 2, 2) patch embedding
    kw["timestep"] = torch.rand(1, S, generator=torch.Generator().manual_seed(2)) * 1000
    return m, kw


def _flux_fused_qkv(dtype):
    """Flux after diffusers' ``fuse_qkv_projections()``: to_qkv / to_added_qkv linears."""
    m, kw = _flux(dtype)
    m.fuse_qkv_projections()
    return m, kw


VARIANTS = {**MODELS, "flux_fused_qkv": _flux_fused_qkv, "wan_ti2v": _wan_ti2v,
            "wan_no_cross_norm": lambda dtype: _wan(dtype, cross_attn_norm=False)}
# the variant's branch, checked on the model and its first fused block's arguments
TAKES_BRANCH = {
    "flux_fused_qkv": lambda m, args: all(a.fused_projections for a in m.modules()
                                          if type(a).__name__ == "FluxAttention"),
    "wan_ti2v": lambda m, args: args[2].dim() == 4,                     # temb (B, S, 6, D)
    "wan_no_cross_norm": lambda m, args: all(isinstance(b.norm2, torch.nn.Identity)
                                             for b in m.blocks),
}


def _inputs(m, kw):
    """kw with the floating activations in the model's dtype (ids, timesteps, masks as given)."""
    return {k: (v.to(next(m.parameters()).dtype) if v.is_floating_point() and k not in (
        "timestep", "txt_ids", "img_ids", "encoder_attention_mask", "guidance", "t") else v)
        for k, v in kw.items()}


def _call(m, kw):
    with torch.no_grad():
        out = m(**_inputs(m, kw), **({} if "x" in kw else {"return_dict": False}))
    return (out if "x" in kw else out[0]).float()


def _err(out, ref):
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    rel = ((out - ref).abs().sum() / ref.abs().sum()).item()
    return cos, rel


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same_state(m, s0):
    s1 = m.state_dict()
    return s1.keys() == s0.keys() and all(
        s1[k].dtype == v.dtype and torch.equal(s1[k], v) for k, v in s0.items())


@pytest.mark.parametrize("family", sorted(MODELS))
def test_patch_none_is_exact_and_remove_restores(family):
    m, kw = MODELS[family](torch.bfloat16)
    ref = _call(m, kw)
    s0 = _state(m)
    h = pyops.patch(m, pyops.PatchConfig(linear=None, attention=None))
    assert torch.equal(_call(m, kw), ref)
    h.remove()
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, **ALL_ON))
    assert not torch.equal(_call(m, kw), ref)  # something was patched
    h.remove()
    h.remove()  # idempotent
    assert _same_state(m, s0)
    assert all(type(x) is not pyops.QuantLinear for x in m.modules())
    assert not any("forward" in vars(x) for x in m.modules())
    assert torch.equal(_call(m, kw), ref)


@pytest.mark.parametrize("family, dtype", [(f, "bfloat16") for f in sorted(MODELS)]
                         + [("flux", "float16")])  # fp16: the fused forwards' fp16 clips
def test_patch_all_on_within_quantization_error(family, dtype):
    dtype = getattr(torch, dtype)
    m, kw = MODELS[family](dtype)
    ref = _call(m.float(), kw)           # fp32 model: the reference
    m = m.to(dtype)
    bf16 = _call(m, kw)
    cos_bf, rel_bf = _err(bf16, ref)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, **ALL_ON))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hunyuan's text mask falls back to SDPA
        out = _call(m, kw)
    cos, rel = _err(out, ref)
    n_fused, routes = EXPECT[family]
    assert len(h.report.fused) == n_fused, h.report
    assert {" ".join(r.split()[:2]) for _, r in h.report.attention} == set(routes), \
        h.report.attention
    assert h.report.quant.quantized
    # FP8 W8A8 + INT8/FP8 attention on random tiny models: a few % relative L1 at most, and
    # the bf16 model's own error stays below it (the test can tell patched from unpatched)
    assert cos > 0.995 and rel < 0.08, (cos, rel)
    assert rel > rel_bf
    h.remove()


@pytest.mark.parametrize("family", ["flux", "flux_fused_qkv", "sd3", "wan", "wan_ti2v",
                                    "wan_no_cross_norm", "hunyuan", "dit"])
def test_fused_equals_unfused_ops(family):
    """Fused producers = the same quantized ops unfused. In an fp32 model the unfused path
    quantizes the same fp32 activations, so the two differ only by the few codes a
    last-ulp difference of the norm's reductions flips. The variants take the fused forwards'
    other branches: fused QKV projections, Wan 2.2 per-token modulation, Wan without the
    cross-attention norm."""
    m, kw = VARIANTS[family](torch.float32)
    cfg = dict(quant=TINY, linear="fp8", attention=None)
    h = pyops.patch(m, pyops.PatchConfig(fuse=False, **cfg))
    unfused = _call(m, kw)
    h.remove()
    h = pyops.patch(m, pyops.PatchConfig(fuse=True, **cfg))
    assert len(h.report.fused) == EXPECT[family.split("_")[0]][0], h.report.blocks
    block_args = []
    first = m.get_submodule(h.report.fused[0])
    hook = first.register_forward_pre_hook(lambda mod, args: block_args.append(args))
    fused = _call(m, kw)
    hook.remove()
    assert block_args and "forward" in vars(first)
    if family in TAKES_BRANCH:
        assert TAKES_BRANCH[family](m, block_args[0]), family
    h.remove()
    plain = _call(m, kw)
    cos, rel = _err(fused, unfused)
    _, rel_q = _err(unfused, plain)  # the quantization error itself
    assert rel < 0.05 * rel_q, (rel, rel_q)


# per fused Flux block: the linears whose input the fused forward produces quantized (the
# norm_modulate_quant or gelu_quant FP8Tensor); every other linear of the block gets a tensor
FP8_INPUT = {
    "FluxTransformerBlock": {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                             "attn.add_k_proj", "attn.add_v_proj", "ff.net.0.proj", "ff.net.2",
                             "ff_context.net.0.proj", "ff_context.net.2"},
    "FluxSingleTransformerBlock": {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"},
}


def test_fused_forward_uses_one_quantization():
    """Every consumer of a fused Flux block's quantized activations (double: q, k, v, added
    q, k, v, both MLPs' in and out; single: q, k, v, proj_mlp) gets the FP8Tensor of the op that
    produced it (no second quantization); the linears after attention or concatenation (to_out,
    to_add_out, proj_out) and the adaLN linears get plain tensors. Recorded per QuantLinear."""
    m, kw = _flux(torch.bfloat16)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, linear="fp8", attention=None))
    assert len(h.report.fused) == 4, h.report.blocks
    seen = collections.defaultdict(set)

    def record(name):
        def hook(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[name].add(type(x).__name__)
        return hook
    hooks = [q.register_forward_pre_hook(record(n), with_kwargs=True)
             for n, q in m.named_modules() if isinstance(q, pyops.QuantLinear)]
    _call(m, kw)
    for hk in hooks:
        hk.remove()
    checked = set()
    for bname in h.report.fused:
        blk = m.get_submodule(bname)
        fp8_in = FP8_INPUT[type(blk).__name__]
        for n, q in blk.named_modules():
            if isinstance(q, pyops.QuantLinear):
                want = "FP8Tensor" if n in fp8_in else "Tensor"
                assert seen[f"{bname}.{n}"] == {want}, (bname, n, seen[f"{bname}.{n}"])
                checked.add((type(blk).__name__, n))
    # every listed consumer exists and was checked, and plain-input linears were checked too
    for cls, names in FP8_INPUT.items():
        assert {(cls, n) for n in names} <= checked
    assert {("FluxTransformerBlock", "attn.to_out.0"), ("FluxTransformerBlock", "attn.to_add_out"),
            ("FluxSingleTransformerBlock", "proj_out")} <= checked
    blk = m.transformer_blocks[0]
    h.remove()
    assert "forward" not in vars(blk)


def test_fuse_skips_blocks_with_bf16_consumers():
    m, kw = _flux(torch.bfloat16)
    q = pyops.QuantConfig(min_dim=0, overrides=[(r"transformer_blocks\.0\.attn\.to_k$", None)])
    h = pyops.patch(m, pyops.PatchConfig(quant=q, linear="fp8", attention=None))
    reasons = dict(h.report.blocks)
    assert "to_k" in reasons["transformer_blocks.0"]
    assert reasons["transformer_blocks.1"] == "fused"
    _call(m, kw)
    h.remove()


class _PyopsCalls(TorchDispatchMode):
    """Counts the ``torch.ops.pyops.*`` calls of an eager forward by op name (under a dispatch
    mode every pyops op goes through its registered op, pyops/_op.py; ops an op's
    implementation calls run below the mode and are not counted, as in a traced graph)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, name = str(func).split(".")[:2]
        if ns == "pyops":
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


_PYOPS_CALL = re.compile(r"torch\.ops\.pyops\.(\w+)(?:\.default)?\(")


def _compiled_matches_patch(m, kw, backend):
    """Compile the patched model ``m`` (fullgraph) with ``backend`` ("eager": Dynamo's graph,
    recorded; "inductor": Inductor's generated code, via run_and_get_code) and check that the
    compiled model runs the patch, not just something close to the model:

    * the compiled code calls every pyops op exactly as often as the eager patched forward
      (which calls pyops attention, norm_modulate_quant and gelu_quant);
    * its output differs from the eager patched one by less than 0.2x what each part of the patch
      changes on its own (the unpatched model, the patch without the attention route, without
      fusion). Inductor runs with ``emulate_precision_casts``: without it, it keeps the bf16 glue
      (gates, residuals) in fp32, and the FP8 codes this flips move the tiny DiT's output by
      0.004, as much as its whole attention route (0.0037), so no bound could tell them apart.

    Returns the eager patched output. The model must be unpatched on entry; it is on exit."""
    variants = {"unpatched": None, "no attention route": dict(attention=None),
                "no fusion": dict(fuse=False)}
    outs = {}
    for what, change in variants.items():
        if change is None:
            outs[what] = _call(m, kw)
            continue
        h = pyops.patch(m, pyops.PatchConfig(quant=TINY, **{**ALL_ON, **change}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs[what] = _call(m, kw)
        h.remove()
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, **ALL_ON))
    with _PyopsCalls() as counter:
        eager = _call(m, kw)
    want = counter.calls
    assert all(want[op] > 0 for op in ("attention", "norm_modulate_quant", "gelu_quant")), want
    torch._dynamo.reset()
    if backend == "inductor":
        from torch._inductor import config as inductor_config
        from torch._inductor.utils import run_and_get_code
        with inductor_config.patch(emulate_precision_casts=True):
            out, code = run_and_get_code(_call, torch.compile(m, fullgraph=True), kw)
    else:
        code = []

        def record(gm, example_inputs):
            code.append(gm.code)
            return gm.forward  # what backend="eager" runs
        out = _call(torch.compile(m, fullgraph=True, backend=record), kw)
    got = collections.Counter(_PYOPS_CALL.findall("\n".join(code)))
    assert got == want, (got, want)
    rel = _err(out, eager)[1]
    for what, o in outs.items():
        effect = _err(eager, o)[1]
        assert rel < 0.2 * effect, (what, rel, effect)
    h.remove()
    return eager


@pytest.mark.parametrize("family, BACKEND", [("flux", "eager"), ("dit", "inductor")])
def test_compile_fullgraph(family, BACKEND):
    """Dynamo traces the patched model without a graph break (Flux: through diffusers' attention
    dispatch and the FP8Tensor hand-off; DiT: the SDPA-override hooks), and Inductor compiles
    the pyops ops' fake implementations (DiT); the compiled model runs every pyops op of the
    patch (see _compiled_matches_patch)."""
    m, kw = MODELS[family](torch.bfloat16)
    _compiled_matches_patch(m, kw, BACKEND)


def test_diffusers_backend_registered():
    members = pyops.register_diffusers_backends()
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
    assert AttentionBackendName("pyops_int8") is members["int8"]
    m, kw = _flux(torch.bfloat16)
    ref = _call(m, kw)
    m.set_attention_backend(backend_name("fp8"))  # diffusers' own API
    out = _call(m, kw)
    m.reset_attention_backend()
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as R
    R.set_active_backend(AttentionBackendName.NATIVE)
    cos, rel = _err(out, ref)
    assert 0 < rel < 0.05, rel
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=g).bfloat16() for _ in range(3))
    o = dispatch_attention_fn(q, k, v, backend=members["bf16"])
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert (o.float() - want).abs().max() < 2e-2


def test_sdpa_override_restores():
    F = torch.nn.functional
    before = F.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 33, 64, generator=g).bfloat16()
    with pyops.sdpa_override("int8"):
        assert F.scaled_dot_product_attention is not before
        o = F.scaled_dot_product_attention(q, q, q)
        with pytest.raises(RuntimeError):
            with pyops.sdpa_override("fp8"):
                raise RuntimeError("inner")
        assert F.scaled_dot_product_attention is not before
    assert F.scaled_dot_product_attention is before
    want = pyops.attention(q, q, q, precision="int8", backend="reference")
    assert torch.equal(o, want)
    with pytest.raises(ValueError, match="precision"):
        with pyops.sdpa_override("int4"):
            pass


def test_sdpa_hook_restored_after_error():
    m, kw = _dit(torch.bfloat16)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, **ALL_ON))
    before = torch.nn.functional.scaled_dot_product_attention
    with pytest.raises(Exception):
        m(x=kw["x"][:, :, :3], t=kw["t"])  # wrong channel count
    assert torch.nn.functional.scaled_dot_product_attention is before
    h.remove()


def test_patch_with_cache_and_sampler():
    """handle.sampler() runs the patched, cached model: its sample is the same preset's
    FewStepSampler on the unpatched model within quantization error, but not equal; the cache
    checked its region at every step (threshold 0: no reuse)."""
    m, kw = _dit(torch.bfloat16)  # bf16: the attention route runs too (fp32 falls back)
    sched, skw = pyops.preset("flux-schnell")
    n_steps = len(sched.timesteps)

    def sample(s):
        with torch.no_grad():
            return s.sample((2, 16, 8), generator=torch.Generator().manual_seed(0))
    plain = sample(pyops.FewStepSampler(m, sched, model_dtype=torch.bfloat16, **skw))
    cache = pyops.CacheConfig(level="step", threshold=0.0, num_steps=n_steps)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, cache=cache, sampler="flux-schnell",
                                         **ALL_ON))
    assert h.cache is not None and "step" in str(h.report)
    x0 = sample(h.sampler())
    assert x0.shape == (2, 16, 8) and torch.isfinite(x0).all()
    cos, rel = _err(x0, plain)
    assert not torch.equal(x0, plain)
    assert cos > 0.999 and rel < 0.05, (cos, rel)  # FP8 + INT8 on a 4-step sample: ~0.007
    assert h.cache.stats["checks"] == n_steps, h.cache.stats
    flags = h.cache.reuse_flags()
    assert flags and all(int(f.sum()) == 0 for f in flags.values()), flags
    h.remove()
    assert not any("forward" in vars(x) for x in m.modules())
    with pytest.raises(ValueError, match="sampler"):
        pyops.patch(m, pyops.PatchConfig(quant=TINY)).sampler()


def test_keep_originals_and_double_patch():
    m, kw = _dit(torch.bfloat16)
    ref = _call(m, kw)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, keep_originals="device"))
    with pytest.raises(ValueError, match="already patched"):
        pyops.patch(m)
    h.remove()
    assert torch.equal(_call(m, kw), ref)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, keep_originals="none"))
    with pytest.warns(UserWarning, match="keep_originals"):
        h.remove()
    assert any(type(x) is pyops.QuantLinear for x in m.modules())


@pytest.mark.parametrize("bad, err, match", [
    (dict(linear="int4"), ValueError, "weight format|linear"),
    (dict(attention="int4"), ValueError, "attention"),
    (dict(keep_originals="gpu"), ValueError, "keep_originals"),
    (dict(quant="fp8"), TypeError, "QuantConfig"),
    (dict(cache=0.1), TypeError, "CacheConfig"),
    (dict(sampler="nope"), ValueError, "nope"),
])
def test_config_errors(bad, err, match):
    m, _ = _dit(torch.float32)
    with pytest.raises(err, match=match):
        pyops.patch(m, pyops.PatchConfig(**bad))
    with pytest.raises(TypeError, match="nn.Module"):
        pyops.patch(lambda x: x)
    with pytest.raises(TypeError, match="PatchConfig"):
        pyops.patch(m, "fp8")
    assert not any(type(x) is pyops.QuantLinear for x in m.modules())


def test_plan_reasons():
    m, _ = _dit(torch.float32)
    fwd, why = B.plan(m.blocks[0])
    assert fwd is None and "QuantLinear" in why
    assert B.plan(torch.nn.Linear(2, 2))[0] is None


# ---- GPU ------------------------------------------------------------------------------------------
def _to(m, kw, device):
    return m.to(device), {k: v.to(device) for k, v in kw.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(MODELS))
def test_gpu_patch_within_quantization_error(family):
    """On the GPU every op runs its CUDA/Triton kernel; the patched output stays within the
    quantization error of the fp32 model, like the reference backends on the CPU."""
    m, kw = MODELS[family](torch.float32)
    m, kw = _to(m, kw, "cuda")
    ref = _call(m, kw)
    m = m.to(torch.bfloat16)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, **ALL_ON))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _call(m, kw)
    cos, rel = _err(out, ref)
    assert cos > 0.995 and rel < 0.08, (cos, rel)
    assert len(h.report.fused) == EXPECT[family][0]
    h.remove()


@pytest.mark.gpu
def test_gpu_compile_and_cuda_graph():
    """torch.compile (Inductor) of a patched model runs every pyops op of the patch and matches
    the eager patched forward (_compiled_matches_patch); a CUDA graph of the forward equals it
    bit for bit."""
    m, kw = _to(*_flux(torch.bfloat16), "cuda")
    _compiled_matches_patch(m, kw, "inductor")
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, **ALL_ON))
    eager = _call(m, kw)
    static = {k: v.clone() for k, v in _inputs(m, kw).items()}  # bf16 activations
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _call(m, static)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        out_g = m(**static, return_dict=False)[0]
    g.replay()
    assert torch.equal(out_g.float(), eager)
    h.remove()


@pytest.mark.gpu
def test_gpu_patched_model_in_captured_sampler():
    m, _ = _dit(torch.bfloat16)
    m = m.cuda()
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, sampler="flux-schnell", **ALL_ON))
    s = h.sampler()
    gen = torch.Generator(device="cuda")
    with torch.no_grad():
        gen.manual_seed(7)
        eager = s.sample((2, 16, 8), generator=gen, device="cuda")
        cap = s.capture((2, 16, 8), generator=gen, device="cuda")
        gen.manual_seed(7)
        out = cap.replay().clone()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    h.remove()


def test_unknown_dispatcher_falls_back_to_sdpa_override(monkeypatch):
    """A diffusers whose registry pyops cannot extend: the dispatcher's native backend calls
    F.scaled_dot_product_attention, which the override routes through pyops."""
    import pyops.patch.model as pm

    def unknown(*args, **kwargs):
        raise AttributeError("no registry")
    monkeypatch.setattr(pm, "register_diffusers_backends", unknown)
    m, kw = _flux(torch.bfloat16)
    ref = _call(m, kw)
    h = pyops.patch(m, pyops.PatchConfig(linear=None, attention="int8"))
    assert {r for _, r in h.report.attention} == {"sdpa override int8"}
    out = _call(m, kw)
    assert 0 < _err(out, ref)[1] < 0.05
    h.remove()
    assert torch.equal(_call(m, kw), ref)


def test_default_attention_auto_keeps_unmeasured_attention():
    """attention='auto' (the default) keeps the model's attention where no measurement shows
    pyops attention faster (everywhere today; a CPU in this test) and says why."""
    m, kw = _flux(torch.bfloat16)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY))
    assert h.config.attention == "auto"
    (name, route), = h.report.attention
    assert route.startswith("kept") and "measured" in route
    assert "attention: kept" in str(h.report)
    procs = [mod.processor for mod in m.modules() if hasattr(mod, "processor")]
    assert all(getattr(p, "_attention_backend", None) is None for p in procs)
    h.remove()


def test_linear_decisions_match_quantize_model():
    """patch applies quantize_model's skip policy layer by layer: same decisions, and the
    replaced originals wait on the CPU."""
    m, kw = _flux(torch.bfloat16)
    q = pyops.QuantConfig(min_dim=0, overrides=[(r"ff_context", "nvfp4")])
    want = pyops.quantize_model(m, q, dry_run=True)
    h = pyops.patch(m, pyops.PatchConfig(quant=q, attention=None))
    got = h.report.quant
    assert [(d.name, d.format, d.reason) for d in got.layers] == \
        [(d.name, d.format, d.reason) for d in want.layers]
    assert all(d.bytes_after > 0 for d in got.quantized)
    assert {type(x).__name__ for x in m.modules()} >= {"QuantLinear"}
    assert any(x.format == "nvfp4" for x in m.modules() if isinstance(x, pyops.QuantLinear))
    # the Flux double blocks' context MLP is NVFP4 now: those blocks keep their forward
    assert all("feed-forward" in why for n, why in h.report.blocks
               if n.startswith("transformer_blocks")), h.report.blocks
    _call(m, kw)
    h.remove()


def test_keep_originals_none_releases_each_replaced_linear(monkeypatch):
    """keep_originals="none": while a linear is being quantized, no earlier replaced bf16 linear
    is still referenced by the patch (on a GPU it would still hold device memory), so the peak
    stays at the bf16 model plus one quantized layer, as _patch_linears promises."""
    import gc
    import weakref

    import pyops.patch.model as pm
    m, _ = _dit(torch.float32)
    refs = [weakref.ref(x) for x in m.modules() if type(x) is torch.nn.Linear]
    orig = pm.QuantLinear.from_linear
    alive = []

    def spy(lin, fmt, backend=None):
        gc.collect()
        inside = {id(x) for x in m.modules()}
        alive.append(sum(1 for r in refs if r() is not None and id(r()) not in inside))
        return orig(lin, fmt, backend=backend)
    monkeypatch.setattr(pm.QuantLinear, "from_linear", spy)
    h = pyops.patch(m, pyops.PatchConfig(quant=TINY, keep_originals="none", attention=None))
    assert len(alive) > 2 and max(alive) == 0, alive
    with pytest.warns(UserWarning, match="keep_originals"):
        h.remove()
