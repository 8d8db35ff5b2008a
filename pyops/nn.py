"""Module-level quantization: ``QuantLinear`` and ``quantize_model``.

    report = pyops.quantize_model(model, "fp8")          # in place; returns what it did and why
    print(report)
    torch.save(model.state_dict(), path)                 # quantized weights: plain tensors
    fresh = build_model(); pyops.quantize_model(fresh, "fp8"); fresh.load_state_dict(torch.load(path))

Default skip policy (layers DiT inference usually keeps in bf16, ``../shared/reference.md``):
embedders (timestep/text/patch embedding MLPs), the model's final projection, adaLN modulation
linears (``adaLN_modulation``, ``adaLN_out``, ``norm*.linear``), and any linear with in_features
or out_features < 1024. Overrides (checked first, in order) map a name pattern (``re.search`` on
the module's qualified name) or a predicate ``(name, module) -> bool`` to a format, or to None to
keep the layer in high precision.

The final projection is the model-level output layer only: a module named ``proj_out``,
``final_layer``, ``final_linear``, ``final_proj``, ``head``, ``out_proj_final`` or ``<x>_proj_out``
(or a linear inside one) that is not inside a repeated block, i.e. no ``.<index>.`` of a
ModuleList comes before it in its qualified name. Names are relative to the module passed to
``quantize_model`` (pass the whole transformer). Examples: diffusers Flux / SD3 / Wan /
HunyuanVideo / PixArt / CogVideoX / LTX ``proj_out``, the embedded DiT's ``proj_out``, original
DiT / HunyuanVideo ``final_layer.linear``, original Wan ``head.head`` are final projections;
``single_transformer_blocks.7.proj_out`` (Flux, HunyuanVideo: the single block's attention+MLP
output, 15360 -> 3072 in Flux-dev, 38 of them, ~15 % of its linear weights),
``transformer_blocks.0.ff.net.2`` and ``blocks.3.attn1.to_out.0`` are not.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .ops.linear import linear
from .weights import (QuantizedWeight, _dtype_from_name, _dtype_name, canonical_format,
                      quantize_weight, weight_from_state_dict)

# The model-level output projection: one of these names, preceded only by path components that
# are not ModuleList indices (a name inside ``blocks.3.`` is a block's layer, not the model's
# output). ``[^.]*[^.0-9][^.]*`` is one non-numeric path component.
_FINAL_PROJECTION = (r"^([^.]*[^.0-9][^.]*\.)*"
                     r"(proj_out|[a-z0-9]+_proj_out|final_layer|final_linear|final_proj|head|"
                     r"out_proj_final)(\.|$)")

# (rule name, regex on the qualified module name): the default skip list, in order
DEFAULT_SKIP_RULES: tuple[tuple[str, str], ...] = (
    ("adaLN modulation", r"(adaLN|ada_ln|adaln|modulation)|(^|\.)norm[^.]*\.linear$"),
    ("embedder", r"(^|\.)[^.]*(embed|embedder|embedding)[^.]*(\.|$)"),
    ("final projection", _FINAL_PROJECTION),
)
MIN_DIM = 1024

Matcher = Union[str, Callable[[str, nn.Module], bool]]


class QuantLinear(nn.Module):
    """A linear layer with an FP8 or NVFP4 weight; ``forward`` calls ``pyops.linear``.

    Buffers (saved in the state dict): ``weight`` (fp8: e4m3 (N, K); nvfp4: uint8 packed
    (N, ceil(K/16)*8)), ``weight_scale`` (fp8: fp32 (N, 1); nvfp4: e4m3 (N, ceil(K/16))),
    ``weight_global_scale`` (nvfp4: fp32 (1,)), ``bias`` (N,) or None. Format and sizes go in the
    module's extra state, so loading a state dict of another format fails loudly.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 format: str = "fp8", dtype: torch.dtype = torch.bfloat16, device=None,
                 backend: Optional[str] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.format = canonical_format(format)
        self.dtype = dtype  # the original weight dtype (dequantize's default)
        self.backend = backend
        N, K = out_features, in_features
        if self.format == "fp8":
            self.register_buffer("weight", torch.zeros(N, K, device=device).to(
                torch.float8_e4m3fn))
            self.register_buffer("weight_scale", torch.ones(N, 1, device=device))
            self.weight_global_scale = None
        else:
            nb = (K + 15) // 16
            self.register_buffer("weight", torch.zeros(N, nb * 8, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("weight_scale", torch.zeros(N, nb, device=device).to(
                torch.float8_e4m3fn))
            self.register_buffer("weight_global_scale", torch.ones(1, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(N, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear_: nn.Linear, format: str = "fp8", *,
                    backend: Optional[str] = None) -> "QuantLinear":
        w = linear_.weight.detach()
        m = cls(linear_.in_features, linear_.out_features, linear_.bias is not None, format,
                w.dtype, w.device, backend)
        m.load_weight(quantize_weight(w, m.format))
        if linear_.bias is not None:
            m.bias.copy_(linear_.bias.detach())
        return m

    def load_weight(self, qw: QuantizedWeight) -> None:
        if qw.format != self.format or tuple(qw.shape) != (self.out_features, self.in_features):
            raise ValueError(f"QuantLinear: weight {qw!r} does not fit {self!r}")
        t = qw.tensors()
        self.weight = t["data"]
        self.weight_scale = t["scale"] if self.format == "fp8" else t["scales"]
        if self.format == "nvfp4":
            self.weight_global_scale = t["global_scale"]

    @property
    def qweight(self) -> QuantizedWeight:
        """The packed weight, as views of this module's buffers (no copy)."""
        meta = {"format": self.format, "shape": [self.out_features, self.in_features],
                "dtype": _dtype_name(self.dtype)}
        if self.format == "fp8":
            return weight_from_state_dict({"data": self.weight, "scale": self.weight_scale},
                                          meta)
        return weight_from_state_dict({"data": self.weight, "scales": self.weight_scale,
                                       "global_scale": self.weight_global_scale}, meta)

    def _apply(self, fn, recurse=True):
        # model.to(dtype)/.half() must move the packed weight and its scales, never re-cast them
        # (an fp32 scale cast to bf16 and back loses bits); the bias follows the model's dtype.
        for n, b in list(self._buffers.items()):
            if b is None:
                continue
            nb = fn(b)
            if n != "bias" and nb.dtype != b.dtype:
                nb = b.to(device=nb.device)
            self._buffers[n] = nb
        return self

    def forward(self, x):
        return linear(x, self.qweight, self.bias, backend=self.backend)

    def get_extra_state(self) -> dict:
        return {"format": self.format, "in_features": self.in_features,
                "out_features": self.out_features, "dtype": _dtype_name(self.dtype)}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        for k in ("format", "in_features", "out_features"):
            if state.get(k) != mine[k]:
                raise ValueError(f"QuantLinear: state dict has {k}={state.get(k)!r}, this "
                                 f"module has {mine[k]!r}")
        self.dtype = _dtype_from_name(state.get("dtype", mine["dtype"]))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}")


@dataclass
class QuantConfig:
    """The configuration of ``quantize_model``: which linears get which format.

    format: default format for every linear not skipped. overrides: ``[(matcher, fmt_or_None)]``
    checked first, in order; a matcher is a regex searched in the qualified name or a predicate
    ``(name, module) -> bool``; ``None`` keeps the layer. default_skip: apply
    ``DEFAULT_SKIP_RULES``. min_dim: skip linears with a dimension below it (0 disables).
    backend: passed to every ``QuantLinear``.
    """
    format: str = "fp8"
    overrides: Sequence[tuple[Matcher, Optional[str]]] = ()
    default_skip: bool = True
    min_dim: int = MIN_DIM
    backend: Optional[str] = None


@dataclass
class LayerDecision:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    format: Optional[str]   # None: kept in high precision
    reason: str
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class QuantReport:
    """What ``quantize_model`` did (or, with ``dry_run``, would do): one ``LayerDecision`` per
    ``nn.Linear`` found (its name, the format chosen or None, and why), with the lists
    ``quantized`` / ``skipped`` and the weight bytes before and after; ``str(report)`` prints a
    table."""
    layers: list[LayerDecision] = field(default_factory=list)
    dry_run: bool = False  # decisions only: nothing was replaced, no bytes_after

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.format is not None]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.format is None]

    def decision(self, name: str) -> LayerDecision:
        for d in self.layers:
            if d.name == name:
                return d
        raise KeyError(name)

    def weight_fraction(self, layers: Sequence[LayerDecision]) -> float:
        """Share of all the linear layers' weight elements (out x in) held by ``layers``;
        0.0 for a model without linear layers."""
        total = sum(d.shape[0] * d.shape[1] for d in self.layers)
        return sum(d.shape[0] * d.shape[1] for d in layers) / total if total else 0.0

    def by_reason(self) -> dict[str, tuple[int, float]]:
        """reason -> (number of layers, ``weight_fraction`` of those layers), in first-seen
        order."""
        groups: dict[str, list[LayerDecision]] = {}
        for d in self.layers:
            groups.setdefault(d.reason, []).append(d)
        return {r: (len(g), self.weight_fraction(g)) for r, g in groups.items()}

    def __str__(self) -> str:
        w = max([40] + [len(d.name) for d in self.layers])
        lines = [f"{'layer':{w}s} {'shape':>12s} {'format':>7s}  reason"]
        for d in self.layers:
            lines.append(f"{d.name:{w}s} {'x'.join(map(str, d.shape)):>12s} "
                         f"{d.format or '-':>7s}  {d.reason}")
        lines.append("by reason: layers, share of the linear weights (elements)")
        for reason, (n, frac) in self.by_reason().items():
            lines.append(f"  {reason:38s} {n:5d} {100 * frac:7.2f} %")
        before = sum(d.bytes_before for d in self.quantized)
        after = sum(d.bytes_after for d in self.quantized)
        size = ("dry run: nothing replaced" if self.dry_run
                else f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
        lines.append(f"{len(self.quantized)} quantized, {len(self.skipped)} kept; "
                     f"{100 * self.weight_fraction(self.quantized):.1f} % of the linear weights "
                     f"quantized, {size}")
        return "\n".join(lines)


def _matches(m: Matcher, name: str, module: nn.Module) -> bool:
    if callable(m):
        return bool(m(name, module))
    return re.search(m, name) is not None


def decide(name: str, module: nn.Linear, cfg: QuantConfig) -> tuple[Optional[str], str]:
    """(format or None, reason) for one linear."""
    for matcher, fmt in cfg.overrides:
        if _matches(matcher, name, module):
            label = matcher if isinstance(matcher, str) else getattr(matcher, "__name__", "fn")
            if fmt is None:
                return None, f"override {label!r}: keep"
            return canonical_format(fmt), f"override {label!r}"
    if cfg.default_skip:
        for rule, pattern in DEFAULT_SKIP_RULES:
            if re.search(pattern, name):
                return None, f"skip: {rule}"
    if cfg.min_dim and min(module.in_features, module.out_features) < cfg.min_dim:
        return None, f"skip: dimension < {cfg.min_dim}"
    return canonical_format(cfg.format), "default"


def quantize_model(model: nn.Module, config: Union[str, QuantConfig, dict] = "fp8", *,
                   dry_run: bool = False) -> QuantReport:
    """Replace the model's ``nn.Linear`` layers by ``QuantLinear`` in place; return the report.

    dry_run: decide and report only (``bytes_after`` stays 0); the model is not touched, so it
    may live on the meta device (e.g. a full-size config built under ``torch.device("meta")``).
    """
    if isinstance(config, str):
        cfg = QuantConfig(format=canonical_format(config))
    elif isinstance(config, dict):
        cfg = QuantConfig(**config)
    elif isinstance(config, QuantConfig):
        cfg = config
    else:
        raise TypeError(f"pyops.quantize_model: config must be a format string, QuantConfig or "
                        f"dict, got {type(config).__name__}")
    canonical_format(cfg.format)
    report = QuantReport(dry_run=dry_run)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for name, mod in targets:
        fmt, reason = decide(name, mod, cfg)
        w = mod.weight
        d = LayerDecision(name, (mod.out_features, mod.in_features), fmt, reason,
                          w.numel() * w.element_size())
        if fmt is not None and not dry_run:
            q = QuantLinear.from_linear(mod, fmt, backend=cfg.backend)
            d.bytes_after = q.qweight.nbytes
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, q)
        report.layers.append(d)
    return report
