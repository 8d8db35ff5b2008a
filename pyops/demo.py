"""CPU-friendly demo: quantize the embedded DiT's weights, print the error per layer.

For each linear: relative error ||W - deq(Q(W))|| / ||W|| and SQNR (dB) of FP8 per output
channel ('row'), FP8 128x128 blocks and NVFP4; then the whole model's output error with every
weight replaced by its dequantized copy (weights only; activations stay fp32).
"""
from __future__ import annotations

import copy
import time

import torch

from .models import DiT, DiTConfig
from .ops.quantize_fp8 import quantize_fp8
from .ops.quantize_nvfp4 import quantize_nvfp4

FORMATS = {
    "fp8 row": lambda w: quantize_fp8(w, "row").dequantize(torch.float32),
    "fp8 128x128": lambda w: quantize_fp8(w, "block128x128").dequantize(torch.float32),
    "nvfp4": lambda w: quantize_nvfp4(w).dequantize(torch.float32),
}


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    num = x.double().pow(2).sum()
    den = (x.double() - y.double()).pow(2).sum()
    return float("inf") if den == 0 else float(10 * torch.log10(num / den))


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / x.double().norm().clamp_min(1e-300))


def main(seed: int = 0, cfg: DiTConfig = DiTConfig(), tokens: int = 256) -> int:
    t0 = time.perf_counter()
    model = DiT.random(cfg, seed=seed).eval()
    print(f"pyops demo: DiT hidden={cfg.hidden} depth={cfg.depth} heads={cfg.heads}, random "
          f"weights (seed {seed}) with outlier input channels; device cpu\n")
    names = list(FORMATS)
    head = f"{'layer':34s} {'shape':>12s} " + " ".join(f"{n + ' relerr':>18s}" for n in names)
    print(head + "   " + " ".join(f"{n + ' SQNR':>14s}" for n in names))
    print("-" * (len(head) + 3 + 15 * len(names)))
    qmodels = {n: copy.deepcopy(model) for n in names}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight.detach()
        errs, sq = [], []
        for n, fn in FORMATS.items():
            d = fn(w)
            errs.append(rel_err(w, d))
            sq.append(sqnr_db(w, d))
            qmodels[n].get_submodule(name).weight.data.copy_(d)
        shape = "x".join(map(str, w.shape))
        print(f"{name:34s} {shape:>12s} " + " ".join(f"{e:18.5f}" for e in errs) + "   "
              + " ".join(f"{s:14.2f}" for s in sq))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, tokens, cfg.in_channels, generator=g)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = model(x, t)
        print(f"\nwhole-model output vs fp32 weights ({tokens} tokens, batch 2):")
        for n, qm in qmodels.items():
            out = qm(x, t)
            cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(),
                                                              dim=0))
            print(f"  {n:14s} relerr {rel_err(ref, out):.5f}  SQNR {sqnr_db(ref, out):6.2f} dB"
                  f"  cosine {cos:.6f}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0
