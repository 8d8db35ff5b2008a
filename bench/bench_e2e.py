"""Whole DiT end to end: one transformer forward per provider at Flux-dev and Wan 2.1 14B sizes,
and a 4-step few-step generation against 50 bf16 steps.

    python bench/bench_e2e.py [--out bench/out] [--full | --quick] [--device cuda]
                              [--model PATH] [--compile-scope regional|whole] [--compile]

Models: diffusers ``FluxTransformer2DModel`` at Flux-dev size (1024²: 4096 image + 512 text
tokens; 19 double + 38 single blocks, 24 heads x 128, joint_attention_dim 4096, pooled 768,
in_channels 64, guidance embedding) and ``WanTransformer3DModel`` at Wan 2.1 14B size (480p, 81
frames: latent (1, 16, 21, 60, 104), patch (1, 2, 2): 32,760 tokens; 40 blocks, 40 heads x 128,
ffn 13824, 512 text tokens of 4096), random weights (seed 0), bf16, batch 1.

Run sizes:
* default: the first 2 double + 4 single Flux blocks and 4 Wan blocks (the token counts and
  widths of the real models). Besides the measured time of that forward the table gives the
  mean per block and an **extrapolated** full-depth time (ms x full blocks / blocks run; the
  embedders and the output projection are ~1 % of one block's FLOPs, so they are counted as if
  they scaled with depth too). ``--full``: every block (Flux ~24 GB, Wan ~29 GB of bf16 weights),
  measured.
* ``--quick`` (the default on a CPU): tiny Flux and Wan models through the same pipeline, the
  reference backends on a CPU: a smoke test, its times are no performance numbers.
* ``--model PATH``: a local diffusers checkpoint (``from_pretrained(PATH, subfolder="transformer"``
  when PATH has one; nothing is downloaded) in place of the random-weight model of its class
  (Flux or Wan); the default run keeps its first blocks as above, ``--full`` all of them.

Providers, one run, the same inputs, the same model object (each applies itself in place and is
undone before the next one):
* ``bf16 eager`` (the reference output) and ``bf16 torch.compile``;
* ``pyops linear fp8`` / ``pyops attention int8`` / ``pyops linear fp8 + fuse``: one part of
  ``pyops.patch`` each; ``pyops all`` (linear fp8, attention int8, fused producers) and ``pyops
  all + torch.compile``; every pyops row is undone with ``handle.remove()``, and the table notes
  whether the model's bf16 output afterwards is bit-identical to the first bf16 eager run;
* ``torchao fp8 rowwise + torch.compile``: ``quantize_(model,
  Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))``, run last (it cannot be
  undone), only when torchao imports (otherwise a blank row with the reason).
torch.compile is regional by default (each transformer block, as diffusers'
``compile_repeated_blocks``: one compile per block class); ``--compile-scope whole`` compiles the
whole model. On a CPU the compiled rows are skipped unless ``--compile`` is given.

Columns: ms per forward (median of CUDA-event-timed calls after warm-up; the first call, which
compiles / JIT-compiles / autotunes, is reported separately as ``warm-up s``), ms per block and
the full-depth time (measured or extrapolated, ``full-depth from`` says which), x bf16 eager and x
bf16 compiled (their ms over this row's: > 1 is faster), peak GiB (torch.cuda.max_memory_allocated
over the timed calls, after a reset: weights + activations; the bf16 linears that pyops replaced
wait on the CPU, ``keep_originals="cpu"``), cos and rel L1 (sum|a-b| / sum|b|) of the output
against the bf16 eager output, in fp32.

Few-step (Flux): 4 steps of ``pyops.FewStepSampler`` (preset ``flux-schnell``) on the pyops-all
model, without and with ``cache=pyops.CacheConfig(...)``, against a 50-step bf16 eager Euler loop,
each time measured (a whole generation per call) at the run's depth.

Outputs in ``--out`` (default bench/out): ``e2e.md`` / ``e2e.json`` (rewritten after every row)
and ``e2e.png`` (the speed-ups, one panel per model; needs matplotlib, otherwise skipped and
said so).
"""
# Run length on an H200, estimated (not measured: this script has not run on a GPU yet). Basis:
# the H200 measurement of 2026-11-30 (bench/RESULTS.md, section 1): a Flux-size forward at 1024²
# takes 174.6 ms in bf16 eager (19 + 38 blocks: ~3.1 ms per block, the two kinds have about the
# same FLOPs), cuDNN SDPA at the Wan 480p shape 38.8 ms, cuBLAS bf16 ~790 TFLOPS.
#   default, ~155 s:
#   * start-up (imports incl. diffusers) ~10 s; building each reduced model on the GPU (1.3 and
#     1.6 B random parameters) ~3 s each, 6 s;
#   * Flux (2 + 4 blocks): ~18 ms per bf16 forward (6 x 3.1 ms); 5 eager rows x (first call +
#     1 warm-up + ~1 s of timed calls) ~6 s; pyops.patch with the bf16 linears moved to the CPU
#     and back (~2.6 GB each way, assumed ~1 s per row) ~4 s; the Triton JIT of the attention
#     and quantizer kernels on first use, assumed ~10 s; few-step: two 50-step bf16 loops ~2 s,
#     two patches and two 4-step runs x ~15 calls ~2 s, ~4 s; 3 compiled rows: compile time was
#     not measured, assumed ~15 s each for a regional compile (2 block classes) + ~1 s of timing,
#     ~48 s. Flux ~72 s.
#   * Wan (4 blocks): ~75 ms per block from the measured parts (SDPA 38.8 ms + 19.6 TFLOP of
#     linears at ~650 TFLOPS ~30 ms + norms/rope/cross-attention ~6 ms), ~300 ms per forward;
#     5 eager rows x (2 + 3 calls) ~8 s; patches ~4 s; 3 compiled rows x (~15 s + ~1.5 s) ~50 s.
#     Wan ~62 s.
#   * the PNG, freeing memory between models, ~3 s.
#   The soft budget (150 s) skips the compiled rows that would start after it, marked so.
#   --full, ~7 min: Flux 57 blocks (11.9 B parameters; 174.6 ms per forward: 5 eager rows x
#   ~2.5 s, the bf16 linears to the CPU and back, ~24 GB, assumed ~8 s per pyops row, 3 compiles
#   ~20 s each, the 50-step loop ~9 s: ~2.5 min) and Wan 40 blocks (14.3 B; ~3 s per forward from
#   the per-block figure above: 8 rows x 5 calls ~2 min, ~10 s per pyops row for its 29 GB, 3
#   compiles ~45 s: ~4 min); not part of the GPU check.
# estimate-h200-s: 155
# gpu-check-limit-s: 200
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

import pyops  # noqa: E402

NAME = "e2e"
DEFAULT_BUDGET_S = 150
GiB = 2**30

COLUMNS = ["model", "blocks", "provider", "ms", "ms/block", "full-depth ms", "full-depth from",
           "x bf16 eager", "x bf16 compiled", "warm-up s", "peak GiB", "cos", "rel L1", "note"]
FEW_COLUMNS = ["model", "blocks", "run", "steps", "ms", "full-depth ms", "full-depth from",
               "x vs 50-step bf16", "reused steps", "note"]

NEEDS_PATCH = ("needs pyops.patch: this pyops has no pyops.patch / pyops.PatchConfig "
               "(pyops/patch/); nothing was measured")


# ---- models ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One model of the run: its class, constructor arguments (without the depth), depth run and
    full depth (Flux: (double, single) blocks; Wan: (blocks,)), and the input sizes."""
    kind: str                  # "flux" | "wan"
    label: str
    config: tuple              # constructor keyword arguments as (name, value) pairs
    depth: tuple
    full_depth: tuple
    latent: tuple              # Flux: (h, w) of the packed token grid; Wan: (B, C, F, H, W)
    text: int                  # text tokens
    path: Optional[str] = None  # a local checkpoint (--model)

    @property
    def blocks(self) -> int:
        return sum(self.depth)

    @property
    def full_blocks(self) -> int:
        return sum(self.full_depth)

    def blocks_label(self) -> str:
        if self.kind == "flux":
            return (f"{self.depth[0]}+{self.depth[1]} of {self.full_depth[0]}+"
                    f"{self.full_depth[1]} (double+single)")
        return f"{self.depth[0]} of {self.full_depth[0]}"


# Flux-dev (black-forest-labs/FLUX.1-dev transformer/config.json; diffusers' defaults except the
# guidance embedding): 1024² image -> 128² latent -> 2x2 packed -> 64 x 64 = 4096 tokens.
FLUX_CONFIG = (("in_channels", 64), ("attention_head_dim", 128), ("num_attention_heads", 24),
               ("joint_attention_dim", 4096), ("pooled_projection_dim", 768),
               ("guidance_embeds", True), ("axes_dims_rope", (16, 56, 56)))
# Wan 2.1 T2V 14B (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json = diffusers'
# defaults): 480x832, 81 frames -> latent (16, 21, 60, 104) -> patch (1, 2, 2): 21*30*52 tokens.
WAN_CONFIG = (("patch_size", (1, 2, 2)), ("num_attention_heads", 40), ("attention_head_dim", 128),
              ("in_channels", 16), ("out_channels", 16), ("text_dim", 4096), ("freq_dim", 256),
              ("ffn_dim", 13824), ("cross_attn_norm", True), ("qk_norm", "rms_norm_across_heads"),
              ("eps", 1e-6))
FLUX_TINY = (("in_channels", 16), ("attention_head_dim", 16), ("num_attention_heads", 2),
             ("joint_attention_dim", 32), ("pooled_projection_dim", 32),
             ("guidance_embeds", True), ("axes_dims_rope", (4, 6, 6)))
WAN_TINY = (("patch_size", (1, 2, 2)), ("num_attention_heads", 2), ("attention_head_dim", 16),
            ("in_channels", 16), ("out_channels", 16), ("text_dim", 32), ("freq_dim", 32),
            ("ffn_dim", 64), ("cross_attn_norm", True), ("qk_norm", "rms_norm_across_heads"),
            ("eps", 1e-6))

FLUX_LABEL = "Flux-dev size, 1024² (4096 img + 512 txt tok)"
WAN_LABEL = "Wan 2.1 14B size, 480p 81 frames (32760 + 512 txt tok)"


def flux_spec(depth, full_depth=(19, 38), config=FLUX_CONFIG, latent=(64, 64), text=512,
              label=FLUX_LABEL, path=None) -> ModelSpec:
    return ModelSpec("flux", label, config, tuple(depth), tuple(full_depth), latent, text, path)


def wan_spec(depth, full_depth=(40,), config=WAN_CONFIG, latent=(1, 16, 21, 60, 104), text=512,
             label=WAN_LABEL, path=None) -> ModelSpec:
    return ModelSpec("wan", label, config, tuple(depth), tuple(full_depth), latent, text, path)


def tiny_specs() -> list:
    return [flux_spec((1, 2), (2, 4), FLUX_TINY, (4, 4), 8,
                      "tiny Flux (16 img + 8 txt tok, 2 heads x 16)"),
            wan_spec((2,), (4,), WAN_TINY, (1, 16, 3, 8, 8), 8,
                     "tiny Wan (48 + 8 txt tok, 2 heads x 16)")]


# ---- providers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prov:
    """A provider: ``patch`` = pyops.PatchConfig keyword arguments (None: no pyops), compiled or
    not, or torchao FP8 rowwise."""
    name: str
    patch: Optional[tuple] = None
    compile: bool = False
    torchao: bool = False


_ALL = (("linear", "fp8"), ("attention", "int8"), ("fuse", True))
PROVIDERS = (
    Prov("bf16 eager"),
    Prov("bf16 torch.compile", compile=True),
    Prov("pyops linear fp8", (("linear", "fp8"), ("attention", None), ("fuse", False))),
    Prov("pyops attention int8", (("linear", None), ("attention", "int8"), ("fuse", False))),
    Prov("pyops linear fp8 + fuse", (("linear", "fp8"), ("attention", None), ("fuse", True))),
    Prov("pyops all", _ALL),
    Prov("pyops all + torch.compile", _ALL, compile=True),
    Prov("torchao fp8 rowwise + torch.compile", compile=True, torchao=True),
)
PROVIDER_NAMES = tuple(p.name for p in PROVIDERS)


def specs_for(mode: str) -> list:
    """The models of a run size (random weights): tiny ones for the quick run, the first blocks
    (2 + 4 Flux, 4 Wan) for the default run, every block for ``--full``."""
    if mode == "quick":
        return tiny_specs()
    full = mode == "full"
    return [flux_spec((19, 38) if full else (2, 4)), wan_spec((40,) if full else (4,))]


def select(mode: str):
    """(models as (kind, label), blocks run per model, provider names) of a run size. The
    default run and ``--full`` take the same models (token counts, widths) and providers; the
    default keeps fewer blocks; the quick run takes tiny models."""
    specs = specs_for(mode)
    return [(s.kind, s.label) for s in specs], [s.depth for s in specs], PROVIDER_NAMES


# ---- building -------------------------------------------------------------------------------------
def _model_class(kind: str):
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel
    return FluxTransformer2DModel if kind == "flux" else WanTransformer3DModel


def _depth_kwargs(spec: ModelSpec, depth: tuple) -> dict:
    if spec.kind == "flux":
        return dict(num_layers=depth[0], num_single_layers=depth[1])
    return dict(num_layers=depth[0])


def block_lists(model) -> list:
    """The model's transformer-block ModuleLists (Flux: double then single; Wan: blocks)."""
    return [getattr(model, n) for n in ("transformer_blocks", "single_transformer_blocks",
                                        "blocks") if isinstance(getattr(model, n, None),
                                                                torch.nn.ModuleList)]


def full_param_count(spec: ModelSpec) -> Optional[int]:
    """Parameters of the full-depth model, counted on the meta device (nothing allocated)."""
    if spec.path is not None:
        return None
    try:
        with torch.device("meta"):
            m = _model_class(spec.kind)(**dict(spec.config), **_depth_kwargs(spec,
                                                                             spec.full_depth))
        return sum(p.numel() for p in m.parameters())
    except Exception:
        return None


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """The model at ``spec.depth`` blocks: random weights (seed 0) built on ``device`` in
    ``dtype``, or ``spec.path`` loaded and cut to its first blocks."""
    if spec.path is not None:
        cls = _model_class(spec.kind)
        sub = "transformer" if (Path(spec.path) / "transformer").is_dir() else None
        model = cls.from_pretrained(spec.path, subfolder=sub, torch_dtype=dtype,
                                    local_files_only=True)
        for ml, keep in zip(block_lists(model), spec.depth):
            del ml[keep:]
        return model.to(device).eval()
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = _model_class(spec.kind)(**dict(spec.config), **_depth_kwargs(spec,
                                                                                 spec.depth))
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def make_inputs(spec: ModelSpec, model, device: torch.device, dtype: torch.dtype) -> dict:
    """The forward's keyword arguments (seeded random latents and text states)."""
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)
    if spec.kind == "flux":
        h, w = spec.latent
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)),
                                         torch.arange(float(w)), indexing="ij"), -1)
        inp = dict(hidden_states=rnd(1, h * w, cfg.in_channels),
                   encoder_hidden_states=rnd(1, spec.text, cfg.joint_attention_dim),
                   pooled_projections=rnd(1, cfg.pooled_projection_dim),
                   timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                   img_ids=ids.reshape(h * w, 3).to(device),
                   txt_ids=torch.zeros(spec.text, 3, device=device))
        if cfg.guidance_embeds:
            inp["guidance"] = torch.full((1,), 3.5, device=device, dtype=torch.float32)
        return inp
    B, C, F, H, W = spec.latent
    return dict(hidden_states=rnd(B, cfg.in_channels, F, H, W),
                timestep=torch.full((B,), 500.0, device=device, dtype=torch.float32),
                encoder_hidden_states=rnd(B, spec.text, cfg.text_dim))


def spec_from_checkpoint(path: str, mode: str) -> ModelSpec:
    """A ModelSpec for a local diffusers checkpoint (Flux or Wan transformer)."""
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"bench_e2e: --model {path}: no such file or folder (a local diffusers "
                         f"checkpoint is needed; nothing is downloaded)")
    cfg_path = p / "transformer" / "config.json"
    if not cfg_path.is_file():
        cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"bench_e2e: --model {path}: no config.json there or in "
                         f"{path}/transformer (expected a diffusers transformer checkpoint)")
    cfg = json.loads(cfg_path.read_text())
    cls = cfg.get("_class_name")
    if cls == "FluxTransformer2DModel":
        full = (int(cfg.get("num_layers", 19)), int(cfg.get("num_single_layers", 38)))
        depth = full if mode == "full" else (min(2, full[0]), min(4, full[1]))
        return flux_spec(depth, full, (), label=f"{FLUX_LABEL}, weights of {p.name}", path=path)
    if cls == "WanTransformer3DModel":
        import importlib.util
        if importlib.util.find_spec("accelerate") is None:
            # diffusers loads models with fp32-kept modules (Wan's) only through accelerate
            raise SystemExit(f"bench_e2e: --model {path}: diffusers needs the package "
                             f"'accelerate' to load a WanTransformer3DModel checkpoint: pip "
                             f"install accelerate")
        full = (int(cfg.get("num_layers", 40)),)
        depth = full if mode == "full" else (min(4, full[0]),)
        ch = int(cfg.get("in_channels", 16))
        return wan_spec(depth, full, (), latent=(1, ch, 21, 60, 104),
                        label=f"{WAN_LABEL}, weights of {p.name}", path=path)
    raise SystemExit(f"bench_e2e: --model {path}: transformer class {cls!r}; supported: "
                     f"FluxTransformer2DModel, WanTransformer3DModel")


# ---- applying a provider --------------------------------------------------------------------------
def compile_model(model, scope: str) -> Callable[[], None]:
    """``torch.compile`` in place (``nn.Module.compile``): every transformer block (``regional``,
    one compile per block class, reused by the blocks of that class) or the whole model.
    Returns the undo function (drops the compiled callables and Dynamo's caches)."""
    U.raise_compile_limits()
    mods = [model] if scope == "whole" else [b for ml in block_lists(model) for b in ml]
    for m in mods:
        m.compile()

    def undo():
        for m in mods:
            m._compiled_call_impl = None
        torch._dynamo.reset()
    return undo


def torchao_fp8(model) -> None:
    """torchao FP8 rowwise (dynamic activations, per-row scales) in place; raises with the
    reason when torchao cannot be used."""
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, PerRow,
                                          quantize_)
    except Exception as e:
        raise _Skip(f"torchao not importable ({type(e).__name__}: {e})"[:160])
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


class _Skip(Exception):
    """A provider that cannot run here (its row stays blank with this reason)."""


def patch_config(prov: Prov, quick: bool, cache=None):
    if not (hasattr(pyops, "patch") and hasattr(pyops, "PatchConfig")):
        raise _Skip(NEEDS_PATCH)
    kw = dict(prov.patch)
    # the tiny quick models are below the skip policy's min_dim (1024): quantize them anyway so
    # the quick run goes through the same QuantLinear path
    quant = pyops.QuantConfig(min_dim=0) if quick else None
    return pyops.PatchConfig(**kw, quant=quant, cache=cache, keep_originals="cpu")


@dataclass
class Applied:
    handle: Any = None
    undo: list = field(default_factory=list)
    destroyed: bool = False   # the model cannot be restored (torchao)


def apply_provider(prov: Prov, model, args) -> Applied:
    a = Applied()
    try:
        if prov.torchao:
            torchao_fp8(model)
            a.destroyed = True
        if prov.patch is not None:
            cfg = patch_config(prov, args.quick)
            a.handle = pyops.patch(model, cfg)
            a.undo.append(a.handle.remove)
        if prov.compile:
            a.undo.append(compile_model(model, args.compile_scope))
    except BaseException:
        undo(a)
        raise
    return a


def undo(a: Applied) -> None:
    while a.undo:
        a.undo.pop()()


def report_text(handle) -> str:
    """``str(handle.report)`` (what pyops.patch did) on one line, for the note."""
    try:
        lines = [x.strip() for x in str(handle.report).strip().splitlines() if x.strip()]
        return "; ".join(lines)[:240]
    except Exception as e:
        return f"(report unreadable: {type(e).__name__})"


# ---- measuring ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, target_s: float = 1.0,
               warmup: int = 1, min_reps: int = 3, max_reps: int = 50) -> tuple[float, Any]:
    """(median ms, the last call's output) of ``fn()`` after ``warmup`` untimed calls.

    Each call is timed by its own pair of CUDA events (``perf_counter`` on a CPU). The first
    timed call is synchronized and sets the number of calls: about ``target_s`` seconds, at
    least ``min_reps`` and at most ``max_reps``; the others are queued back to back (no host
    sync between them, as in a generation loop) and read after one synchronize."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"

    def one():
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            o = fn()
            e.record()
            return o, (s, e)
        t = time.perf_counter()
        o = fn()
        return o, (time.perf_counter() - t) * 1e3

    out, first = one()
    if cuda:
        first[1].synchronize()
        first = first[0].elapsed_time(first[1])
    n = int(min(max(min_reps, target_s * 1e3 / max(first, 1e-3)), max_reps))
    marks = []
    for _ in range(n - 1):
        out, m = one()
        marks.append(m)
    if cuda:
        torch.cuda.synchronize(device)
        marks = [s.elapsed_time(e) for s, e in marks]
    return statistics.median([first] + marks), out


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative L1 = sum|a-b| / sum|b|) of two outputs, in fp32."""
    a, b = out.float().reshape(-1), ref.float().reshape(-1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    rel = ((a - b).abs().sum() / b.abs().sum().clamp_min(1e-30)).item()
    return cos, rel


def peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- progress ---------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar over the runs (tqdm imported lazily); a plain counter line without tqdm."""

    def __init__(self, total: int, enabled: bool = True):
        self.n, self.total, self.bar = 0, total, None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="bench_e2e", unit="run", file=sys.stderr,
                                dynamic_ncols=True)
            except Exception:
                self.bar = None

    def step(self, what: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60])
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- one model ----------------------------------------------------------------------------------
@dataclass
class State:
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    model: Any = None
    inputs: dict = field(default_factory=dict)
    ref: Optional[torch.Tensor] = None
    ms: dict = field(default_factory=dict)   # provider name -> ms
    dirty: bool = False

    def ensure_model(self):
        if self.model is None or self.dirty:
            self.model = None
            free(self.device)
            self.model = build_model(self.spec, self.device, self.dtype)
            self.inputs = make_inputs(self.spec, self.model, self.device, self.dtype)
            self.dirty = False
        return self.model

    def forward(self):
        return self.model(**self.inputs, return_dict=False)[0]


def extrapolate(ms: Optional[float], spec: ModelSpec) -> tuple[Optional[float], Optional[str]]:
    """(full-depth ms, how it was obtained): measured when the run had every block, else
    ms x full blocks / blocks run (labelled extrapolated)."""
    if ms is None:
        return None, None
    if spec.blocks == spec.full_blocks:
        return ms, "measured"
    return (ms * spec.full_blocks / spec.blocks,
            f"extrapolated: ms x {spec.full_blocks}/{spec.blocks}")


def run_model(st: State, args, table: U.Table, budget: U.Budget, compile_ok: bool,
              progress: Progress, before_torchao: Optional[Callable[[State], None]] = None
              ) -> None:
    """One row per provider for ``st.spec``, in ``PROVIDERS`` order. After the providers that
    can be undone: the restore check, then ``before_torchao(st)`` (the few-step part, while the
    model is still bf16), then the torchao row (last: it cannot be undone)."""
    spec = st.spec
    st.ensure_model()
    nparam = sum(p.numel() for p in st.model.parameters())
    full_n = full_param_count(spec)
    table.notes.append(
        f"{spec.label}: {spec.blocks_label()} blocks run, {_count(nparam)} parameters"
        + (f" ({_count(full_n)} at full depth)" if full_n and full_n != nparam else "")
        + (f", weights from {spec.path}" if spec.path else ", random weights (seed 0)")
        + f", {str(st.dtype).replace('torch.', '')}, batch 1")
    rows = []
    pyops_ran = False
    for prov in PROVIDERS:
        if prov.torchao:
            if pyops_ran:
                restore_check(st, table)
            if before_torchao is not None:
                before_torchao(st)
        progress.step(f"{spec.kind}: {prov.name}")
        row = run_provider(st, prov, args, budget, compile_ok, progress)
        pyops_ran |= prov.patch is not None and row.get("ms") is not None
        rows.append(row)
        speedups(rows, st)
        table.add(**row)
        progress.write("  " + "  ".join(f"{k}={U._fmt(row[k])}" for k in COLUMNS
                                        if row.get(k) is not None and k != "model"))
    speedups(rows, st)  # the bf16 eager row gets its x bf16 compiled now
    if table.on_add is not None:
        table.on_add(table)  # rewrite the files with those columns


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def speedups(rows: list, st: State) -> None:
    """x bf16 eager / x bf16 compiled of every row measured so far (their ms / the row's)."""
    e_ms, c_ms = st.ms.get("bf16 eager"), st.ms.get("bf16 torch.compile")
    for r in rows:
        if r.get("ms"):
            r["x bf16 eager"] = e_ms / r["ms"] if e_ms else None
            r["x bf16 compiled"] = c_ms / r["ms"] if c_ms else None


def run_provider(st: State, prov: Prov, args, budget: U.Budget, compile_ok: bool,
                 progress: Progress) -> dict:
    """Apply ``prov`` to the model, time the forward, compare with the bf16 eager output,
    undo; returns the row (a provider that cannot run or fails gets a note and no numbers)."""
    spec, device = st.spec, st.device
    row = dict(model=spec.label, blocks=spec.blocks_label(), provider=prov.name)
    if prov.compile and not compile_ok:
        row["note"] = "skipped: torch.compile providers not run on a CPU (--compile runs them)"
        return row
    if prov.compile and budget.spent():
        row["note"] = "skipped: time budget spent"
        return row
    if prov.patch is not None and not hasattr(pyops, "patch"):
        row["note"] = NEEDS_PATCH
        return row
    reps = _reps(args.mode)
    a = None
    try:
        st.ensure_model()
        t0 = time.perf_counter()
        a = apply_provider(prov, st.model, args)
        with torch.inference_mode():
            st.forward()  # first call: compile / JIT / autotune
            sync(device)
            row["warm-up s"] = time.perf_counter() - t0
            reset_peak(device)
            ms, out = time_calls(st.forward, device, **reps)
            row["peak GiB"] = peak_gib(device)
        if prov.name == "bf16 eager":
            st.ref = out.detach().clone()
        if st.ref is not None:
            row["cos"], row["rel L1"] = compare(out, st.ref)
        del out
        row["ms"] = ms
        st.ms[prov.name] = ms
        row["ms/block"] = ms / spec.blocks
        row["full-depth ms"], row["full-depth from"] = extrapolate(ms, spec)
        if a.handle is not None:
            row["note"] = "patch: " + report_text(a.handle)
    except _Skip as e:
        row["note"] = f"not run: {e}"
    except Exception as e:  # one broken provider must not lose the others' rows
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        row["note"] = f"error: {msg}"
        progress.write(f"[bench_e2e] {spec.kind} {prov.name}: {msg}")
        if prov.patch is not None or prov.torchao:
            st.dirty = True  # possibly half applied: rebuild before the next provider
    finally:
        if a is not None:
            try:
                undo(a)
            except Exception as e:
                st.dirty = True
                row["note"] = (row.get("note", "") + f"; undo failed: {type(e).__name__}: "
                               f"{e}")[:240].lstrip("; ")
            if a.destroyed:
                st.dirty = True
        sync(device)
        free(device)
    return row


def _reps(mode: str) -> dict:
    """time_calls arguments by run size (the quick run: one warm-up call after the first, two
    timed calls: without it a provider's first timed calls can carry one-time costs, which made
    the smoke-test plot show an eager-vs-patched ratio that was no such thing)."""
    return U.pick(mode, quick=dict(target_s=0.0, warmup=1, min_reps=2),
                  default=dict(target_s=1.0, warmup=1, min_reps=3),
                  full=dict(target_s=2.0, warmup=1, min_reps=3))


def restore_check(st: State, table: U.Table) -> None:
    """After the pyops rows: is the model's bf16 output bit-identical to the first bf16 eager
    output (handle.remove() restored it)?"""
    if st.ref is None or st.dirty:
        table.notes.append(f"{st.spec.label}: restore check not run (no reference output, or a "
                           f"provider failed and the model was rebuilt)")
        return
    try:
        with torch.inference_mode():
            out = st.forward()
        same = torch.equal(out, st.ref)
        _, rel = compare(out, st.ref)
        table.notes.append(
            f"{st.spec.label}: after the pyops rows (each undone by handle.remove()), the bf16 "
            f"eager output is " + ("bit-identical to the first bf16 eager run" if same else
                                   f"NOT identical to the first bf16 eager run (rel L1 {rel:.3g})"))
    except Exception as e:
        table.notes.append(f"{st.spec.label}: restore check failed: {type(e).__name__}: {e}"[:200])


# ---- few-step (Flux) --------------------------------------------------------------------------------
FEW_STEPS = 4
BASE_STEPS = 50


def euler_loop(st: State, steps: int) -> torch.Tensor:
    """A plain bf16 eager Euler flow loop of ``steps`` forwards (the 50-step baseline)."""
    inp = dict(st.inputs)
    x = inp.pop("hidden_states").clone()
    sig = torch.linspace(1.0, 0.0, steps + 1, device=st.device)
    for i in range(steps):
        v = st.model(hidden_states=x, timestep=sig[i:i + 1].to(x.dtype), return_dict=False,
                     **{k: w for k, w in inp.items() if k != "timestep"})[0]
        x = x + (sig[i + 1] - sig[i]).to(x.dtype) * v
    return x


def run_few_step(st: State, args, table: U.Table, progress: Progress) -> None:
    spec, device = st.spec, st.device
    base = dict(model=spec.label, blocks=spec.blocks_label())
    # the model is warm from the provider rows: the 50-step loop needs no warm-up loop
    loop_reps = U.pick(args.mode, quick=dict(target_s=0.0, warmup=0, min_reps=1),
                       default=dict(target_s=2.0, warmup=0, min_reps=2, max_reps=5),
                       full=dict(target_s=0.0, warmup=0, min_reps=1))
    reps = dict(_reps(args.mode), warmup=1)  # the sampler's first generation: warm-up (JIT)
    # 50-step bf16 eager baseline, measured as a whole loop
    progress.step(f"{spec.kind}: few-step: bf16 eager {BASE_STEPS} steps")
    row = dict(base, run=f"bf16 eager, Euler loop, {BASE_STEPS} steps", steps=BASE_STEPS)
    base_ms = None
    try:
        st.ensure_model()
        with torch.inference_mode():
            base_ms, _ = time_calls(lambda: euler_loop(st, BASE_STEPS), device, **loop_reps)
        row["ms"] = base_ms
        row["full-depth ms"], row["full-depth from"] = extrapolate(base_ms, spec)
        row["x vs 50-step bf16"] = 1.0
        row["note"] = "measured loop"
    except Exception as e:
        row["note"] = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
    table.add(**row)
    for with_cache in (False, True):
        name = "pyops all" + (" + cache" if with_cache else "")
        progress.step(f"{spec.kind}: few-step: {name}")
        row = dict(base, run=f"{name}, FewStepSampler flux-schnell, {FEW_STEPS} steps",
                   steps=FEW_STEPS)
        if not hasattr(pyops, "patch"):
            row["note"] = NEEDS_PATCH
            table.add(**row)
            continue
        a = None
        try:
            st.ensure_model()
            cache = (pyops.CacheConfig(level="step", num_steps=FEW_STEPS)
                     if with_cache else None)
            cfg = patch_config(Prov(name, _ALL), args.quick, cache=cache)
            st.dirty = True  # until the handle exists and is removed
            a = Applied(handle=pyops.patch(st.model, cfg))
            a.undo.append(a.handle.remove)
            sched, kw = pyops.preset("flux-schnell")
            fwd = pyops.diffusers_model(st.model)
            smp = pyops.FewStepSampler(fwd, sched, model_dtype=st.dtype, **kw)
            cond = {k: v for k, v in st.inputs.items() if k not in ("hidden_states", "timestep")}
            shape = tuple(st.inputs["hidden_states"].shape)
            gen = torch.Generator(device=device)
            cached = a.handle.cache

            def sample(callback=None):
                gen.manual_seed(2)
                if cached is not None:
                    cached.reset()
                return smp.sample(shape, cond=cond, generator=gen, device=device,
                                  dtype=st.dtype, callback=callback)
            with torch.inference_mode():
                ms, _ = time_calls(sample, device, **reps)
                if cached is not None:
                    reused = []

                    def count(i, t, x, state):
                        flags = cached.reuse_flags()
                        reused.append(any(bool(f.reshape(-1)[0]) for f in flags.values()))
                    sample(callback=count)
                    row["reused steps"] = f"{sum(reused)}/{len(reused)}"
            row["ms"] = ms
            row["full-depth ms"], row["full-depth from"] = extrapolate(ms, spec)
            if base_ms:
                row["x vs 50-step bf16"] = base_ms / ms
            if with_cache:
                row["note"] = (f"CacheConfig(level='step', threshold="
                               f"{cache.threshold}, num_steps={FEW_STEPS})")
        except _Skip as e:
            row["note"] = f"not run: {e}"
        except Exception as e:
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            row["note"] = f"error: {msg}"
            progress.write(f"[bench_e2e] few-step {name}: {msg}")
        finally:
            if a is not None:
                try:
                    undo(a)
                    st.dirty = False
                except Exception:
                    st.dirty = True
            free(device)
        table.add(**row)
        progress.write("  " + "  ".join(f"{k}={U._fmt(row[k])}" for k in FEW_COLUMNS
                                        if row.get(k) is not None and k != "model"))


# ---- the plot -------------------------------------------------------------------------------------
def write_png(path: Path, table: U.Table, few: U.Table, env: dict) -> Optional[str]:
    """Bar charts of the speed-ups (x bf16 eager, x bf16 compiled), one panel per model, and the
    few-step speed-up; returns None when written, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib not importable ({type(e).__name__}); pip install matplotlib"
    models = list(dict.fromkeys(r["model"] for r in table.rows))
    panels = [(m, [r for r in table.rows if r["model"] == m]) for m in models]
    few_rows = [r for r in few.rows if r.get("x vs 50-step bf16") is not None]
    n = len(panels) + (1 if few_rows else 0)
    if n == 0:
        return "no rows to plot"
    fig, axes = plt.subplots(n, 1, figsize=(11, 0.45 * 9 * n + 0.8), squeeze=False)
    card = env.get("gpu") or "a CPU: smoke test, the times are NOT performance numbers"
    fig.suptitle(f"bench_e2e on {card} ({env.get('date', '')[:10]})", fontsize=10)

    def bars(ax, y, vals, off, h, label, missing=" not measured"):
        ax.barh([v + off for v in y], [v or 0.0 for v in vals], height=h, label=label)
        for yy, v in zip(y, vals):
            text = f" {v:.2f}x" if v is not None else missing
            if text:
                ax.text(v or 0.0, yy + off, text, va="center", fontsize=7)

    for ax, (m, rows) in zip(axes[:, 0], panels):
        y = list(range(len(rows)))
        compiled = [r.get("x bf16 compiled") for r in rows]
        title = f"{m}\n{rows[0]['blocks']} blocks: one forward"
        if any(v is not None for v in compiled):
            bars(ax, y, [r.get("x bf16 eager") for r in rows], -0.2, 0.4, "x bf16 eager")
            bars(ax, y, compiled, 0.2, 0.4, "x bf16 compiled", missing="")
            ax.legend(fontsize=7, loc="lower right")
        else:
            bars(ax, y, [r.get("x bf16 eager") for r in rows], 0.0, 0.6, "x bf16 eager")
            title += " (x bf16 eager; bf16 torch.compile not measured)"
        ax.set_yticks(y)
        ax.set_yticklabels([r["provider"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("speed-up (> 1: faster)", fontsize=8)
    if few_rows:
        ax = axes[-1, 0]
        y = list(range(len(few_rows)))
        bars(ax, y, [r["x vs 50-step bf16"] for r in few_rows], 0.0, 0.5, None)
        ax.set_yticks(y)
        ax.set_yticklabels([r["run"] for r in few_rows], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{few_rows[0]['model']}\n{few_rows[0]['blocks']} blocks: whole "
                     f"generation vs 50-step bf16 eager", fontsize=9)
        ax.set_xlabel("speed-up (> 1: faster)", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return None


# ---- main -----------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = U.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a local diffusers Flux or Wan checkpoint (its transformer/ subfolder "
                        "when present) instead of the random-weight model of its class; "
                        "nothing is downloaded")
    p.add_argument("--compile-scope", choices=("regional", "whole"), default="regional",
                   help="torch.compile each transformer block (default; one compile per block "
                        "class) or the whole model")
    p.add_argument("--compile", action="store_true", help="run the torch.compile rows on a CPU "
                   "too")
    p.add_argument("--no-few-step", action="store_true", help="skip the few-step comparison")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.model is not None:  # a clear error before anything runs
        spec_from_checkpoint(args.model, "full" if args.full else "default")
    device = U.resolve_run(args, DEFAULT_BUDGET_S)
    if device.type != "cuda" and args.quick:
        print("NOTE: the speed numbers need a CUDA GPU: this run only checks the pipeline "
              "(tiny models, reference backends).", flush=True)
    dtype = torch.bfloat16
    env = U.env_record(device)
    env["run"] = args.mode
    specs = [spec_from_checkpoint(args.model, args.mode)] if args.model else specs_for(args.mode)
    table = U.Table("Whole transformer, one forward (batch 1, bf16)", COLUMNS, notes=[
        "ms: median per forward after warm-up (CUDA events); warm-up s: applying the provider "
        "(patch / quantize / compile wrap) + the first call (compile, JIT); ms/block: ms / blocks "
        "run (the embedders and output projection included); x bf16 eager / x bf16 compiled: "
        "their ms / this row's ms (> 1: faster); peak GiB: max_memory_allocated over the timed "
        "calls; cos / rel L1: output vs bf16 eager, fp32.",
        "full-depth ms: measured when every block ran, otherwise EXTRAPOLATED (ms x full blocks "
        "/ blocks run), not measured.",
        f"torch.compile: {args.compile_scope} ("
        + ("each transformer block, one compile per block class" if args.compile_scope ==
           "regional" else "the whole model") + "); pyops rows: pyops.patch(model, "
        "PatchConfig(..., keep_originals='cpu'))" + (", quant=QuantConfig(min_dim=0) (tiny "
                                                      "models)" if args.quick else "")])
    few = U.Table("Few-step generation vs 50-step bf16 (Flux)", FEW_COLUMNS, notes=[
        "ms: one whole generation (all forwards + the sampler), median after warm-up, measured "
        "at the blocks run; full-depth ms as in the table above; x vs 50-step bf16: the 50-step "
        "bf16 eager loop's ms / this row's ms.",
        "random weights: the cache reuses little or nothing (reused steps); its speed-up needs a "
        "trained model."])
    U.autosave([table, few], args.out, NAME, env)
    compile_ok = U.compile_allowed(args, device, table)
    budget = U.Budget(args.budget_s)
    n_runs = len(specs) * len(PROVIDERS) + (3 if not args.no_few_step and any(
        s.kind == "flux" for s in specs) else 0)
    progress = Progress(n_runs, enabled=not args.no_progress)
    png = Path(args.out) / f"{NAME}.png"
    png.unlink(missing_ok=True)  # never leave an earlier run's plot beside this run's table
    try:
        for spec in specs:
            st = State(spec, device, dtype)
            few_step = None
            if spec.kind == "flux" and not args.no_few_step:
                few_step = lambda s: run_few_step(s, args, few, progress)  # noqa: E731
            run_model(st, args, table, budget, compile_ok, progress, before_torchao=few_step)
            st.model = None
            st.ref = None
            free(device)
    finally:
        progress.close()
        try:
            why = write_png(png, table, few, env)
        except Exception as e:  # a plotting problem must not lose the tables
            why = f"plotting failed: {type(e).__name__}: {e}"[:200]
        if why is not None:
            table.notes.append(f"no PNG: {why}")
        U.write_results(args.out, NAME, [table, few], env)
    print(U.env_markdown(env) + "\n\n" + table.markdown() + "\n\n" + few.markdown())
    out = Path(args.out)
    print(f"\nbench_e2e: table {out / (NAME + '.md')} (JSON {out / (NAME + '.json')}); "
          + (f"plot {png}" if why is None else f"no plot ({why})"), flush=True)
    if device.type != "cuda":
        print("bench_e2e: CPU run: the times above are no performance numbers; the speed "
              "numbers need a CUDA GPU (python bench/bench_e2e.py there).", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
