"""``pyops.info()`` / ``python -m pyops info``: versions, GPU, and the backend each op will use."""
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
    """Print (and return) versions, the GPU and its arch, and the backend chosen per op."""
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
        major, minor = torch.cuda.get_device_capability(device)
        d["gpu"] = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    else:
        d["gpu"] = ("none (CPU: PyTorch reference backend; Triton kernels with TRITON_INTERPRET=1)"
                    if _backend.triton_status()[0] else
                    "none (CPU: PyTorch reference backend; `pip install triton` to run the Triton "
                    "kernels in its interpreter with TRITON_INTERPRET=1)")
    d["backends"] = {}
    for op in _backend.ops():
        try:
            chosen = _backend.resolve(op, device)
        except Exception as e:  # an env override that cannot run
            chosen = f"error: {e}"
        avail = {bk: _backend.available(op, bk, device)[0] for bk in _backend.BACKENDS}
        d["backends"][op] = {"chosen": chosen,
                             "available": [bk for bk, ok in avail.items() if ok]}
    if file is not False:
        lines = [f"{k:16s} {v}" for k, v in d.items() if k != "backends"]
        lines.append(f"{'backends on ' + str(device):16s}")
        for op, v in d["backends"].items():
            lines.append(f"  {op:20s} -> {v['chosen']:10s} (available: "
                         f"{', '.join(v['available'])})")
        print("\n".join(lines), file=file)
    return d
