"""Input validation shared by every op: clear Python errors before any kernel launch."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(op: str, name: str, x, dtypes=FLOAT_DTYPES, min_ndim: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pyops.{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"pyops.{op}: {name} has dtype {str(x.dtype).replace('torch.', '')}; "
                        f"supported: {names}")
    if x.dim() < min_ndim:
        raise ValueError(f"pyops.{op}: {name} must have at least {min_ndim} dim(s), got shape "
                         f"{tuple(x.shape)}")
    if x.device.type not in ("cuda", "cpu"):
        raise ValueError(f"pyops.{op}: {name} is on {x.device}; pyops runs on CUDA (and on CPU "
                         f"through the reference)")
    if x.numel() == 0:
        raise ValueError(f"pyops.{op}: {name} is empty (shape {tuple(x.shape)})")


def check_same_device(op: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"pyops.{op}: {name} is on {t.device} but the input is on "
                             f"{ref.device}")


def check_finite(op: str, x: torch.Tensor) -> None:
    """Opt-in host-side check (synchronizes the device). Raises on inf/NaN."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"pyops.{op}: input holds inf or NaN (check_finite=True)")


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory ranges of a and b intersect (conservative: spans, not elements)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = t.data_ptr()
        hi = lo + t.element_size() * (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))
        return lo, hi

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """(…, K) -> (M, K), a view whenever strides allow (kernels take any 2-D strides)."""
    if x.dim() == 2:
        return x
    return x.reshape(-1, x.shape[-1])


def eager_fast_path(*tensors: torch.Tensor) -> bool:
    """True when an op may skip the dispatcher and call its implementation directly.

    Only in plain eager mode with real tensors: under torch.compile, export, fake tensors or any
    dispatch mode the registered op is used so tracing sees it.
    """
    if torch.compiler.is_compiling():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    if _get_current_dispatch_mode() is not None:
        return False
    return all(type(t) is torch.Tensor and not t.requires_grad for t in tensors if t is not None)
