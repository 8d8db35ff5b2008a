"""The CPU demo (README's main job without a GPU) and `python -m pyops info` run and say
something meaningful."""
import subprocess
import sys

import torch

import pyops
from pyops import demo
from pyops.models import DiT, DiTConfig


def test_demo_small(capsys):
    cfg = DiTConfig(hidden=256, depth=1, heads=4, in_channels=16)
    assert demo.main(seed=1, cfg=cfg, tokens=8) == 0
    out = capsys.readouterr().out
    assert "blocks.0.fc2" in out and "nvfp4" in out
    # FP8 keeps a random DiT's output within a few percent; NVFP4 is coarser but sane
    cos = {ln.split("relerr")[0].strip(): float(ln.split("cosine")[1])
           for ln in out.splitlines() if "cosine" in ln}
    assert set(cos) == {"fp8 row", "fp8 128x128", "nvfp4"}
    assert cos["fp8 row"] > 0.99 and cos["fp8 128x128"] > 0.99 and cos["nvfp4"] > 0.9


def test_info_cli():
    r = subprocess.run([sys.executable, "-m", "pyops", "info"], capture_output=True, text=True,
                       check=True)
    assert "quantize_fp8" in r.stdout and "torch" in r.stdout
    d = pyops.info(file=False)
    assert d["backends"]["quantize_nvfp4"]["chosen"] in ("cuda", "triton", "reference")


def test_dit_shapes_and_determinism():
    cfg = DiTConfig(hidden=64, depth=2, heads=4, in_channels=8)
    a, b = DiT.random(cfg, seed=3), DiT.random(cfg, seed=3)
    x = torch.randn(2, 5, 8)
    t = torch.tensor([0.1, 0.9])
    ya, yb = a(x, t), b(x, t)
    assert ya.shape == x.shape and torch.equal(ya, yb)
