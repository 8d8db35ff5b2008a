"""``PatchConfig``: what :func:`pyops.patch` changes in a model."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..cache.config import CacheConfig
from ..nn import QuantConfig
from ..reference.attention import PRECISIONS
from ..weights import canonical_format

LINEAR_FORMATS = ("fp8", "nvfp4")
KEEP_ORIGINALS = ("cpu", "device", "none")
_NONE = (None, "none")


@dataclass
class PatchConfig:
    """The configuration of :func:`pyops.patch` (one call per transformer).

    linear: ``"fp8"`` (W8A8: e4m3 weights per output channel, activations per token, through
        ``pyops.linear``), ``"nvfp4"`` (W4A16 on Hopper, W4A4 on Blackwell) or None / ``"none"``
        (linears untouched). Which linears: :data:`pyops.nn.DEFAULT_SKIP_RULES` and
        ``QuantConfig.min_dim`` (embedders, adaLN modulation, the final projection and linears
        narrower than 1024 stay in bf16), or ``quant``.
    attention: ``"int8"`` | ``"fp8"`` | ``"int8_fp16pv"`` | ``"nvfp4"`` | ``"bf16"`` (the
        precisions of :func:`pyops.attention`), None / ``"none"`` (attention untouched) or
        ``"auto"`` (the default): pyops attention only on a GPU where ``bench/RESULTS.md`` shows
        it faster than the model's own SDPA, else untouched. Today that is nowhere: on the H200
        (2026-11-30) pyops INT8 attention ran at 0.42-0.97x cuDNN SDPA, so ``"auto"`` keeps the
        model's attention and the report says so; ask for a precision to use it anyway.
    fuse: in blocks pyops knows (diffusers Flux double/single, Wan, SD3 joint, HunyuanVideo
        double, the embedded DiT), replace
        the block's forward by one that runs ``norm_modulate_quant`` (norm + adaLN modulate +
        per-token FP8 in one pass) for the QKV / MLP-in linears and ``gelu_quant`` for the
        MLP-out linear, so each activation is quantized once by the op that produces it.
        Needs ``linear="fp8"``; a block whose consumers are not all FP8 linears (a skip rule, an
        IP-adapter processor) keeps its forward (the report says why).
    quant: a :class:`pyops.QuantConfig` for the skip policy (``overrides``, ``default_skip``,
        ``min_dim``); its ``format`` is replaced by ``linear``.
    cache: a :class:`pyops.CacheConfig`: :func:`pyops.cache_model` applied on top (models it
        knows: diffusers Flux and Wan, the embedded DiT).
    sampler: a few-step preset name (:func:`pyops.preset`, e.g. ``"flux-schnell"``); the handle's
        ``sampler()`` then builds a :class:`pyops.FewStepSampler` on the patched model.
    keep_originals: where the replaced bf16 linears wait for ``remove()``: ``"cpu"`` (host
        memory; the GPU holds only the quantized weights), ``"device"`` (no copy; the bf16
        weights plus the quantized ones, 1.5x with FP8) or ``"none"`` (dropped: ``remove()``
        cannot restore the linears).
    backend: passed to every op: the linears, the fused producers, attention (on diffusers'
        dispatcher as the backend ``pyops_<precision>_<backend>``) and the cache (when its own
        ``backend`` is None). None: each op's measured auto policy; ``"reference"`` runs the
        PyTorch specs, e.g. to check numerics.
    """
    linear: Optional[str] = "fp8"
    attention: Optional[str] = "auto"
    fuse: bool = True
    quant: Optional[QuantConfig] = None
    cache: Optional[CacheConfig] = None
    sampler: Optional[str] = None
    keep_originals: str = "cpu"
    backend: Optional[str] = None

    def validated(self) -> "PatchConfig":
        """A copy with canonical names; raises ValueError / TypeError for a bad field."""
        lin = None if self.linear in _NONE else self.linear
        if lin is not None:
            if not isinstance(lin, str):
                raise TypeError(f"pyops.PatchConfig: linear must be a string or None, got "
                                f"{type(lin).__name__}")
            lin = canonical_format(lin)
            if lin not in LINEAR_FORMATS:
                raise ValueError(f"pyops.PatchConfig: linear={self.linear!r}; expected one of "
                                 f"{LINEAR_FORMATS} or None")
        att = None if self.attention in (None, "none") else self.attention
        if att is not None and att != "auto" and att not in PRECISIONS:
            raise ValueError(f"pyops.PatchConfig: attention={self.attention!r}; expected one of "
                             f"{PRECISIONS}, 'auto' or None")
        if self.quant is not None and not isinstance(self.quant, QuantConfig):
            raise TypeError(f"pyops.PatchConfig: quant must be a pyops.QuantConfig, got "
                            f"{type(self.quant).__name__}")
        if self.cache is not None and not isinstance(self.cache, CacheConfig):
            raise TypeError(f"pyops.PatchConfig: cache must be a pyops.CacheConfig, got "
                            f"{type(self.cache).__name__}")
        if self.keep_originals not in KEEP_ORIGINALS:
            raise ValueError(f"pyops.PatchConfig: keep_originals={self.keep_originals!r}; "
                             f"expected one of {KEEP_ORIGINALS}")
        if self.sampler is not None:
            from ..sampler.presets import preset
            preset(self.sampler)  # raises ValueError for an unknown name
        return replace(self, linear=lin, attention=att, fuse=bool(self.fuse))
