"""``pyops.info()`` / ``python -m pyops info``: versions, the GPU's capability table, and per op
the backend auto mode picks, the backends that can run, and the policy behind the choice."""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Optional

import torch

from . import _backend


def build_info() -> dict:
    """What setup.py recorded about the CUDA extension build (archs, or why it was skipped)."""
    p = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def info(file=None, device: Optional[torch.device] = None) -> dict:
    """Print (and return) versions, the GPU and its capability table, and per op the backend auto
    mode picks, the available backends and the op's policy (which measurement it comes from).

    Backend names: ``cuda`` = pyops' CUDA kernel, ``triton`` = pyops' Triton kernel, ``torch`` = a
    vendor kernel through torch (cuBLAS / ``torch._scaled_mm``), ``reference`` = the PyTorch spec.
    For ops with a per-shape policy (the linears) "chosen" is the choice without shape
    information; the policy line says how shapes change it. ``file=False`` prints nothing."""
    from . import __version__
    d = {"pyops": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "torch.cuda": torch.version.cuda}
    d["triton"] = _backend.triton_status()[1]
    d["cuda_extension"] = _backend.extension_status()[1]
    b = build_info()
    if b:
        d["cuda_extension_build"] = b
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        major, minor = _backend.device_capability(device)
        d["gpu"] = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    else:
        d["gpu"] = ("none (CPU: PyTorch reference backend; Triton kernels with TRITON_INTERPRET=1)"
                    if _backend.triton_status()[0] else
                    "none (CPU: PyTorch reference backend; `pip install triton` to run the Triton "
                    "kernels in its interpreter with TRITON_INTERPRET=1)")
    d["capabilities"] = _backend.capabilities(device)
    d["backends"] = {}
    for op in _backend.ops():
        try:
            chosen = _backend.resolve(op, device)
        except Exception as e:  # an env override that cannot run
            chosen = f"error: {e}"
        avail = {bk: _backend.available(op, bk, device)[0] for bk in _backend.BACKENDS}
        module = _backend.impl(op, "reference").__module__  # the op's module: pyops.ops.<op>
        d["backends"][op] = {"chosen": chosen,
                             "registered": [bk for bk in _backend.BACKENDS
                                            if bk in _backend._IMPLS[op]],
                             "available": [bk for bk, ok in avail.items() if ok],
                             "module": module,
                             "policy": _backend.policy(op) or "fixed order: cuda, triton, "
                                                              "torch, reference"}
    if file is not False:
        lines = [f"{k:16s} {v}" for k, v in d.items() if k != "backends"]
        lines.append(f"{'backends on ' + str(device):16s} (cuda: pyops CUDA kernel, triton: pyops "
                     f"Triton kernel, torch: vendor kernel via torch, reference: PyTorch spec)")
        for op, v in d["backends"].items():
            lines.append(f"  {op:20s} -> {v['chosen']:10s} (has: {', '.join(v['registered'])};"
                         f" available here: {', '.join(v['available'])}; {v['module']})")
            if _backend.policy(op):
                lines.append(f"  {'':20s}    policy: {v['policy']}")
        print("\n".join(lines), file=file)
    return d
