"""pyops.nn: QuantLinear, quantize_model's skip policy and overrides, state-dict round trip, and
the embedded DiT quantized end to end (CPU: the reference backends)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import pyops
from pyops.ops.linear import linear
from pyops.weights import quantize_weight
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


# ---- the final-projection rule on real DiT layouts (diffusers models, random weights, CPU) ------
FINAL = "skip: final projection"


@pytest.mark.parametrize("name,final", [
    ("proj_out", True), ("final_layer.linear", True), ("head.head", True),
    ("final_linear", True), ("audio_proj_out", True), ("transformer.proj_out", True),
    ("single_transformer_blocks.0.proj_out", False),
    ("single_transformer_blocks.37.proj_out", False),
    ("transformer_blocks.0.ff.net.2", False), ("transformer_blocks.3.attn.to_out.0", False),
    ("blocks.0.head", False), ("blocks.2.final_layer.linear", False), ("proj_out_extra", False),
    ("multi_head", False), ("blocks.0.proj", False),
])
def test_final_projection_rule(name, final):
    """Only a model-level output projection is a "final projection"; a layer of the same name
    inside a repeated block (``.<index>.`` before it) is an ordinary block linear."""
    fmt, reason = pyops.nn.decide(name, nn.Linear(2048, 2048), QuantConfig("fp8"))
    assert (reason == FINAL) is final, (name, reason)
    assert (fmt is None) is final


def _finals(report):
    return {d.name for d in report.layers if d.reason == FINAL}


def _tiny_flux():
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=(4, 4, 8))


def _tiny_sd3():
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)


def _tiny_wan():
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                                 ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                 rope_max_seq_len=32)


def _tiny_hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                          attention_head_dim=10, num_layers=1,
                                          num_single_layers=2, num_refiner_layers=1,
                                          patch_size=1, patch_size_t=1, text_embed_dim=16,
                                          pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))


def _tiny_pixart():
    from diffusers import PixArtTransformer2DModel
    return PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, caption_channels=32, in_channels=4,
                                    cross_attention_dim=16, out_channels=8, attention_bias=True,
                                    activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False,
                                    norm_eps=1e-6)


@pytest.mark.parametrize("build", [_tiny_flux, _tiny_sd3, _tiny_wan, _tiny_hunyuan_video,
                                   _tiny_pixart], ids=lambda f: f.__name__[6:])
def test_diffusers_final_projection_is_the_top_level_proj_out(build):
    """Each diffusers DiT: exactly the top-level ``proj_out`` is skipped as the final projection
    (min_dim off, so every other linear is quantized unless another rule keeps it)."""
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = build().eval()
    names = [n for n, mod in m.named_modules() if type(mod) is nn.Linear]
    assert "proj_out" in names
    r = quantize_model(m, {"format": "fp8", "min_dim": 0})
    assert _finals(r) == {"proj_out"}
    assert type(m.get_submodule("proj_out")) is nn.Linear
    inner = [n for n in names if n.endswith(".proj_out")]  # Flux/HunyuanVideo single blocks
    for n in inner:
        assert r.decision(n).format == "fp8" and r.decision(n).reason == "default", n
        assert isinstance(m.get_submodule(n), QuantLinear), n
    if build in (_tiny_flux, _tiny_hunyuan_video):
        assert len(inner) == 2
    # the default config (min_dim 1024) gives the same final-projection verdict
    assert _finals(quantize_model(build(), "fp8", dry_run=True)) == {"proj_out"}


def test_flux_width_1024_report():
    """A Flux-layout model wide enough for the default min_dim: the single blocks' proj_out
    (5120 -> 1024) is quantized, only the top-level proj_out (1024 -> 16) is the final
    projection, and the report's counts and weight shares add up (computed here from the
    module shapes)."""
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                               attention_head_dim=128, num_attention_heads=8,
                               joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=(16, 56, 56)).to(torch.bfloat16).eval()
    ref_model = copy.deepcopy(m)
    shapes = {n: mod.weight.shape for n, mod in m.named_modules() if type(mod) is nn.Linear}
    total = sum(a * b for a, b in shapes.values())
    r = quantize_model(m, "fp8")
    assert _finals(r) == {"proj_out"}
    for i in range(2):
        n = f"single_transformer_blocks.{i}.proj_out"
        assert r.decision(n).format == "fp8" and isinstance(m.get_submodule(n), QuantLinear)
    adaln = {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
             "single_transformer_blocks.0.norm.linear", "single_transformer_blocks.1.norm.linear",
             "norm_out.linear"}
    embed = {n for n in shapes if "embed" in n}
    assert len(embed) == 6
    quantized = set(shapes) - adaln - embed - {"proj_out"}
    assert {d.name for d in r.quantized} == quantized and len(quantized) == 22
    counts = r.by_reason()
    assert counts[FINAL] == (1, pytest.approx(16 * 1024 / total))
    assert counts["skip: adaLN modulation"][0] == 5 and counts["skip: embedder"][0] == 6
    want_q = sum(shapes[n][0] * shapes[n][1] for n in quantized) / total
    assert counts["default"] == (22, pytest.approx(want_q))
    assert r.weight_fraction(r.quantized) == pytest.approx(want_q)
    assert sum(f for _, f in counts.values()) == pytest.approx(1.0)
    s = str(r)
    assert "22 quantized, 12 kept" in s and f"{100 * want_q:.1f} % of the linear weights" in s
    # the quantized model still runs and stays close to the bf16 one
    g = torch.Generator().manual_seed(1)
    S, T = 16, 8
    inputs = dict(hidden_states=torch.randn(1, S, 16, generator=g).to(torch.bfloat16),
                  encoder_hidden_states=torch.randn(1, T, 32, generator=g).to(torch.bfloat16),
                  pooled_projections=torch.randn(1, 32, generator=g).to(torch.bfloat16),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(S, 3),
                  txt_ids=torch.zeros(T, 3))
    with torch.no_grad():
        want = ref_model(**inputs).sample.float()
        got = m(**inputs).sample.float()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.99, float(cos)


@pytest.mark.parametrize("which", ["flux-dev", "hunyuan-video"])
def test_full_size_configs_dry_run(which):
    """The published configs, built on the meta device (no weights): one final projection, and
    every single block's proj_out (Flux-dev: 38 x 15360 -> 3072, 15 % of the linear weights)
    quantized."""
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel
    with torch.device("meta"):
        if which == "flux-dev":
            m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19,
                                       num_single_layers=38, attention_head_dim=128,
                                       num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True,
                                       axes_dims_rope=(16, 56, 56))
            n_single, out_dim = 38, 64
        else:
            m = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16,
                                               num_attention_heads=24, attention_head_dim=128,
                                               num_layers=20, num_single_layers=40,
                                               num_refiner_layers=2, patch_size=2,
                                               patch_size_t=1, text_embed_dim=4096,
                                               pooled_projection_dim=768,
                                               rope_axes_dim=(16, 56, 56))
            n_single, out_dim = 40, 64
    shapes = {n: mod.weight.shape for n, mod in m.named_modules() if type(mod) is nn.Linear}
    total = sum(a * b for a, b in shapes.values())
    r = quantize_model(m, "fp8", dry_run=True)
    assert r.dry_run and "dry run" in str(r)
    assert _finals(r) == {"proj_out"} and tuple(shapes["proj_out"]) == (out_dim, 3072)
    assert r.by_reason()[FINAL] == (1, pytest.approx(out_dim * 3072 / total))
    singles = [n for n in shapes if n.startswith("single_transformer_blocks.")
               and n.endswith(".proj_out")]
    assert len(singles) == n_single
    assert all(r.decision(n).format == "fp8" for n in singles)
    share = sum(shapes[n][0] * shapes[n][1] for n in singles) / total
    if which == "flux-dev":
        assert 0.15 < share < 0.152  # 38 * 15360 * 3072 of 11.9 B linear weights
    assert not any(isinstance(mod, QuantLinear) for mod in m.modules())  # nothing replaced
