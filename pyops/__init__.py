"""pyops: FP8/NVFP4 quantization, caching and few-step sampling kernels for DiT inference."""
from __future__ import annotations

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _alias_triton_kernels() -> None:
    """Make ``pyops.triton_kernels`` importable from a source checkout or an editable install.

    setup.py installs the repository's top-level ``triton_kernels/`` as ``pyops.triton_kernels``
    (never as a top-level ``triton_kernels``, which is the Triton project's own package). When
    this ``pyops`` package is the source folder (no ``triton_kernels`` inside it, the sibling
    source folder beside it), map that sibling under the name, so the kernels always come from
    the same tree as this file, whatever other installs of pyops exist.
    """
    if "pyops.triton_kernels" in _sys.modules:
        return
    here = _Path(__file__).resolve().parent
    src = here.parent / "triton_kernels"
    init = src / "__init__.py"
    if (here / "triton_kernels").exists() or not init.exists():
        return  # an installed package: the regular import finds pyops/triton_kernels
    spec = _ilu.spec_from_file_location("pyops.triton_kernels", init,
                                        submodule_search_locations=[str(src)])
    mod = _ilu.module_from_spec(spec)
    _sys.modules["pyops.triton_kernels"] = mod
    spec.loader.exec_module(mod)


_alias_triton_kernels()

from . import _backend  # noqa: E402
from . import ops  # noqa: E402,F401  (registers torch.ops.pyops.*)
from ._info import info  # noqa: E402
from .ops.quantize_fp8 import FP8Tensor, dequantize_fp8, quantize_fp8  # noqa: E402
from .ops.quantize_nvfp4 import NVFP4Tensor, dequantize_nvfp4, quantize_nvfp4  # noqa: E402

from . import cache, graphs, nn  # noqa: E402
from .cache import (  # noqa: E402
    BlockSpec,
    CacheConfig,
    CachedModel,
    block_similarity,
    cache_apply,
)
from .cache import apply as cache_model  # noqa: E402
from .ops.attention import attention, sdpa  # noqa: E402
from .ops.norm_modulate_quant import norm_modulate_quant  # noqa: E402
from .ops.gelu_quant import gelu_quant  # noqa: E402
from .nn import QuantConfig, QuantLinear, QuantReport, quantize_model  # noqa: E402
from .ops.linear import linear  # noqa: E402
from .ops.weight_only_linear import weight_only_linear  # noqa: E402
from .weights import FP8Weight, NVFP4Weight, QuantizedWeight, quantize_weight  # noqa: E402
from . import sampler  # noqa: E402
from .patch import (PatchConfig, PatchHandle, PatchReport, sdpa_override,  # noqa: E402
                    register_diffusers_backends)
from . import patch  # noqa: E402  (a callable module: pyops.patch(model, config))
from .sampler import (  # noqa: E402
    CapturedSampler,
    FewStepSampler,
    Schedule,
    StepCoefficients,
    diffusers_model,
    flow_schedule,
    preset,
    sample_step,
    trigflow_schedule,
    vp_schedule,
)

# Static facts resolution reads, loaded now so that no import happens while torch.compile traces.
_backend.triton_status()
_backend.extension_status()

__all__ = [
    "__version__", "info",
    # quantization formats
    "FP8Tensor", "NVFP4Tensor", "quantize_fp8", "dequantize_fp8", "quantize_nvfp4",
    "dequantize_nvfp4",
    # quantized linear layers and the fused norm + modulate + quant
    "norm_modulate_quant", "gelu_quant", "quantize_weight", "linear", "weight_only_linear",
    "FP8Weight", "NVFP4Weight",
    "QuantizedWeight", "nn", "QuantLinear", "quantize_model", "QuantConfig", "QuantReport",
    # attention
    "attention", "sdpa",
    # caching
    "cache", "graphs", "block_similarity", "cache_apply", "CacheConfig", "CachedModel",
    "BlockSpec", "cache_model",
    # few-step sampling
    "sampler", "FewStepSampler", "CapturedSampler", "Schedule", "StepCoefficients", "sample_step",
    "flow_schedule", "vp_schedule", "trigflow_schedule", "preset", "diffusers_model",
    # the whole-model drop-in
    "patch", "PatchConfig", "PatchHandle", "PatchReport", "sdpa_override",
    "register_diffusers_backends",
]
