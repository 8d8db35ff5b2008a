"""The CPU demo (``python -m pyops demo``, the README's main job without a GPU): real samples
from a trained model, generated four ways from the same noise.

The model is :func:`pyops.models.digits.trained_flux` ``("quick")``: a small stock diffusers
``FluxTransformer2DModel`` trained with rectified flow on scikit-learn's bundled 8×8 digits
(class-conditional), loaded from its on-disk cache or trained there once (about a minute on 2 CPU
cores). From one batch of noise and class labels (``i % 10``) it samples with flow Euler:

* **uncached**, ``steps`` steps (28): the reference;
* **cached**: the same, with ``pyops.cache_model(transformer, CacheConfig(num_steps=steps))``,
  every other field at :class:`pyops.CacheConfig`'s defaults (whatever they are: the demo shows
  what a user who copies them gets);
* **fp8**: the same, with ``pyops.patch(transformer, PatchConfig(quant=QuantConfig(min_dim=0)))``
  (FP8 W8A8 linears and the fused norm/GELU + FP8 producers; ``min_dim=0`` because every linear
  of this model is narrower than the default 1024; on CPU tensors every op runs its PyTorch
  reference), removed afterwards;
* **fp8 + cached**: both (``PatchConfig(cache=...)``);
* **few steps**: uncached, ``few_steps`` steps (4).

It prints, per way: the fraction of gated block computes the cache skipped (``handle.stats``
where it has ``"skipped"``, else the per-step reuse flags), relative L1 and PSNR of the images
against the uncached ones (:func:`pyops.models.digits.rel_l1`, :func:`~pyops.models.digits.psnr`),
the Fréchet distance to the held-out real digits and the class accuracy (both in the digits
classifier's space, :meth:`~pyops.models.digits.TrainedFlux.frechet_distance`), and the wall time
on this CPU (not a performance number: pyops' kernels target GPUs). The FD of ``n`` real training
digits against the same held-out set is printed as the floor sampling noise sets. Then a short
table of the one-forward error of FP8 and NVFP4 linears, and a PNG grid of the first
``rows`` × 10 samples of every way (needs matplotlib; skipped with a note without it).

Needs diffusers and scikit-learn (``pip install --no-build-isolation -e ".[bench]"``); pyops itself
does not.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

INSTALL_HINT = 'pip install --no-build-isolation -e ".[bench]"'
# (import name, pip name) the demo cannot run without
REQUIRED = (("diffusers", "diffusers"), ("sklearn", "scikit-learn"))
CLASSES = 10


class ArgumentError(ValueError):
    """A bad argument of :func:`main`, raised before any work (``python -m pyops demo`` turns
    it, and only it, into a usage error)."""


def missing_requirements() -> list[str]:
    """pip names of the packages in :data:`REQUIRED` that cannot be imported."""
    out = []
    for mod, pip_name in REQUIRED:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a bad spec
            found = False
        if not found or (mod in sys.modules and sys.modules[mod] is None):
            out.append(pip_name)
    return out


@dataclass
class Way:
    """One way of sampling: ``name``, ``steps``, cache on/off, FP8 patch on/off."""
    name: str
    steps: int
    cache: bool = False
    fp8: bool = False


@dataclass
class Result:
    way: Way
    tokens: torch.Tensor          # (n, tokens, channels) fp32 latents
    seconds: float                # wall time of the sampling loop
    skipped: Optional[float]      # fraction of gated block computes skipped; None: no cache
    note: str = ""


def _skipped(handle, flags: list) -> float:
    """The cache handle's skipped fraction: ``handle.stats["skipped"]`` when the handle reports
    it, else the fraction of forwards whose step-level region was reused (``flags``, one per
    step; at the step level both are the same number)."""
    st = getattr(handle, "stats", None)
    if isinstance(st, dict) and "skipped" in st:
        return float(st["skipped"])
    return sum(flags) / max(1, len(flags))


def _generate(m, way: Way, noise, labels) -> Result:
    import pyops
    from pyops.nn import QuantConfig

    handle, cache, note = None, None, ""
    if way.fp8:
        cfg = pyops.PatchConfig(linear="fp8", quant=QuantConfig(min_dim=0),
                                cache=pyops.CacheConfig(num_steps=way.steps) if way.cache else None)
        handle = pyops.patch(m.transformer, cfg)
        cache = handle.cache
        note = str(handle.report).splitlines()[0]  # "linears: N quantized, M kept (...)"
    elif way.cache:
        handle = cache = pyops.cache_model(m.transformer, pyops.CacheConfig(num_steps=way.steps))
    flags: list = []

    def count(*_):
        flags.append(int(cache.regions()[-1].reuse[0] != 0))

    try:
        t0 = time.perf_counter()
        out = m.sample(noise, labels, way.steps, callback=count if cache is not None else None)
        sec = time.perf_counter() - t0
        skipped = _skipped(cache, flags) if cache is not None else None
    finally:
        if handle is not None:
            handle.remove()
    return Result(way, out, sec, skipped, note)


def _weight_table(m, noise, labels) -> list[str]:
    """One forward (σ = 0.5) with each format's quantized linears vs fp32: weight and output
    relative errors (Frobenius), over the linears ``quantize_model`` picks with ``min_dim=0``."""
    import pyops
    from pyops.nn import QuantConfig, QuantLinear

    with torch.no_grad():
        ref = m.velocity(noise, 0.5, labels)
        lines = []
        for fmt, what in (("fp8", "W8A8, per channel / per token"),
                          ("nvfp4", "W4A16, blocks of 16")):
            q = copy.deepcopy(m.transformer)
            report = pyops.quantize_model(q, QuantConfig(format=fmt, min_dim=0))
            num = den = 0.0
            for d in report.quantized:
                w = m.transformer.get_submodule(d.name).weight.double()
                lin = q.get_submodule(d.name)
                assert isinstance(lin, QuantLinear)
                num += float((lin.qweight.dequantize(torch.float32).double() - w).pow(2).sum())
                den += float(w.pow(2).sum())
            out = m.velocity(noise, 0.5, labels, model=q)
            err = float((out.double() - ref.double()).norm() / ref.double().norm())
            lines.append(f"  {fmt:6s} {len(report.quantized):3d} linears  weight rel err "
                         f"{math.sqrt(num / den):.4f}  output rel err {err:.4f}  ({what})")
    return lines


def _say(text: str) -> None:
    """Print a paragraph wrapped at 100 columns."""
    print(textwrap.fill(text, 100, subsequent_indent="  ", break_long_words=False,
                        break_on_hyphens=False), flush=True)


def _fmt(v: Optional[float], spec: str) -> str:
    """``v`` formatted with ``spec`` ("8.4f"); "-" (None) and "inf" right-aligned to its width."""
    width = int(spec.split(".")[0] or 0)
    if v is None:
        return "-".rjust(width)
    if math.isinf(v):
        return "inf".rjust(width)
    return format(v, spec)


def _grid(tiles: torch.Tensor, rows: int, pad: int = 1) -> torch.Tensor:
    """(rows·10, 1, s, s) images → one (rows·(s+pad)−pad, 10·(s+pad)−pad) array; gaps −1."""
    s = tiles.shape[-1]
    g = torch.full((rows * (s + pad) - pad, CLASSES * (s + pad) - pad), -1.0)
    for i in range(rows * CLASSES):
        r, c = divmod(i, CLASSES)
        g[r * (s + pad):r * (s + pad) + s, c * (s + pad):c * (s + pad) + s] = tiles[i, 0]
    return g


def write_png(path: Path, panels: list, rows: int) -> Optional[str]:
    """Write the grid PNG: one panel per (title, images (≥ rows·10, 1, s, s) in [−1, 1]),
    stacked. Returns None, or why no PNG was written (matplotlib missing, a plotting error)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return f"matplotlib is not installed ({INSTALL_HINT} adds it)"
    try:
        fig = Figure(figsize=(7.5, len(panels) * (0.55 * rows + 0.45)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        for ax, (title, imgs) in zip(axes, panels):
            ax.imshow(_grid(imgs[:rows * CLASSES].float(), rows).numpy(), cmap="gray_r",
                      vmin=-1, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=8, loc="left")
            ax.set_axis_off()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except Exception as e:  # noqa: BLE001 - the table is the result; the PNG is a view of it
        return f"plotting failed: {type(e).__name__}: {e}"
    return None


def main(seed: int = 0, out: str = "bench/out", n: int = 200, rows: int = 2, steps: int = 28,
         few_steps: int = 4, preset: str = "quick", threads: Optional[int] = None) -> int:
    """Run the demo; print the table; write ``<out>/demo.png``. Returns 0, or 1 when diffusers
    or scikit-learn is missing (the message, on stderr, names the install command).

    seed: noise seed; n: samples per way for the metrics (the first ``rows``·10 are drawn);
    steps: the reference / cached / FP8 step count; few_steps: the few-step row's; preset: the
    :data:`pyops.models.digits.PRESETS` name; threads: ``torch.set_num_threads`` for the run
    (restored afterwards; None: unchanged).
    Raises :class:`ArgumentError` (a ``ValueError``) for ``rows < 1``, ``n < rows·10``,
    ``steps``/``few_steps`` < 1, ``threads`` < 1 or an unknown ``preset``, before any work.
    """
    if threads is not None and threads < 1:
        raise ArgumentError(f"pyops demo: threads must be >= 1, got {threads}")
    from .models.digits import PRESETS
    if preset not in PRESETS:
        raise ArgumentError(f"pyops demo: unknown preset {preset!r}; expected one of "
                            f"{sorted(PRESETS)}")
    if rows < 1 or n < rows * CLASSES:
        raise ArgumentError(f"pyops demo: need rows >= 1 and n >= rows*10 samples "
                            f"(rows={rows}, n={n})")
    if steps < 1 or few_steps < 1:
        raise ArgumentError(f"pyops demo: steps and few_steps must be >= 1 ({steps}, "
                            f"{few_steps})")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _main(seed, out, n, rows, steps, few_steps, preset)
    finally:
        torch.set_num_threads(before)


def _main(seed, out, n, rows, steps, few_steps, preset) -> int:
    t_start = time.perf_counter()
    missing = missing_requirements()
    if missing:
        print(f"pyops demo: needs {' and '.join(missing)} (the trained digits model is a diffusers "
              f"Flux transformer trained on scikit-learn's bundled digits): {INSTALL_HINT}",
              file=sys.stderr)
        return 1
    import pyops
    from pyops.models import digits as D

    c = D.PRESETS[preset]
    path = D.model_path(preset)
    _say(f"pyops demo: a diffusers FluxTransformer2DModel trained on scikit-learn's digits "
          f"(preset {preset!r}: {c.layers}+{c.single_layers} blocks, width "
          f"{c.heads * c.head_dim}, {c.size}x{c.size} pixels, {c.tokens} tokens); CPU, "
          f"{torch.get_num_threads()} thread(s)")
    cached = path.is_file()
    if cached:
        print(f"  loading it from {path}")
    else:
        _say(f"  not in the cache: training it now ({c.train_steps} steps, about a minute on 2 "
             f"CPU cores; once: it is then kept in {path})")
    m = D.trained_flux(preset, progress=True)  # CPU, fp32
    if not cached and path.is_file():
        print(f"  saved to {path} (the next run loads it)")
    info = m.info
    _say(f"  trained in {info.get('seconds', float('nan')):.0f} s, final loss "
          f"{info.get('final_loss', float('nan')):.3f}; the digits classifier behind FD and "
          f"accuracy labels {100 * info.get('classifier_test_accuracy', float('nan')):.1f} % of "
          f"the held-out digits right")

    labels = torch.arange(n) % CLASSES
    noise = m.noise(n, seed=seed)
    cc = pyops.CacheConfig(num_steps=steps)
    ways = [Way("uncached", steps), Way("cached", steps, cache=True),
            Way("fp8 linears", steps, fp8=True), Way("fp8 + cached", steps, cache=True, fp8=True),
            Way("few steps", few_steps)]
    print()
    _say(f"{n} samples (labels i % 10, noise seed {seed}), flow Euler, no guidance. cached: "
          f"pyops.cache_model with CacheConfig(num_steps={steps}) defaults: level {cc.level!r}, "
          f"threshold {cc.threshold}, rule {cc.rule!r}, warmup {cc.warmup}, last_steps "
          f"{cc.last_steps}, fn {cc.fn}, bn {cc.bn}. fp8: pyops.patch(PatchConfig(quant="
          f"QuantConfig(min_dim=0))), reference backends on CPU.")
    with torch.no_grad():  # untimed warm-up: one-time costs stay out of the first row's time
        m.velocity(noise[:2], 1.0, labels[:2])
    results = []
    for w in ways:
        results.append(_generate(m, w, noise, labels))
    ref = m.images(results[0].tokens)

    blocks = len(m.transformer.transformer_blocks) + len(m.transformer.single_transformer_blocks)
    gated = blocks - cc.fn - cc.bn
    head = (f"{'way':14s} {'steps':>5s} {'skipped':>8s} {'rel L1':>8s} {'PSNR dB':>8s} "
            f"{'FD':>7s} {'acc %':>6s} {'CPU s':>7s}")
    print("\n" + head + "\n" + "-" * len(head))
    panels = [("real (held-out digits)", m.test_images[
        torch.cat([torch.nonzero(m.test_labels == k)[:rows].flatten()
                   for k in range(CLASSES)]).view(CLASSES, -1).T.flatten()])]
    for r in results:
        img = m.images(r.tokens)
        first = r is results[0]
        rl1 = None if first else D.rel_l1(img, ref)
        ps = None if first else D.psnr(img, ref)
        fd = m.frechet_distance(img)
        acc = 100 * m.accuracy(img, labels)
        print(f"{r.way.name:14s} {r.way.steps:5d} {_fmt(r.skipped, '8.1%')} "
              f"{_fmt(rl1, '8.4f')} {_fmt(ps, '8.1f')} {fd:7.2f} {acc:6.1f} {r.seconds:7.2f}")
        bits = [f"{r.way.name}, {r.way.steps} steps" + (" (the reference)" if first else "")]
        if r.skipped is not None:
            bits.append(f"skipped {100 * r.skipped:.0f} %")
        if not first:
            bits.append(f"rel L1 {rl1:.3f}")
        bits.append(f"FD {fd:.2f}, acc {acc:.0f} %")
        panels.append((": ".join([bits[0], ", ".join(bits[1:])]), img))
    xtr = D.digits(c.size, c.seed)[0]
    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:n]
    floor = m.frechet_distance(xtr[pick])
    print()
    _say(f"skipped: fraction of the gated block computes the cache skipped (blocks "
          f"{cc.fn + 1}-{blocks - cc.bn} of {blocks}; {blocks - gated} of {blocks} run at every "
          f"step, so {100 * gated / blocks:.0f} % of it is the share of all block computes).")
    _say("rel L1 / PSNR: images vs the uncached ones (same noise); FD: Fréchet distance to the "
          f"{len(m.test_images)} held-out real digits in the classifier's feature space (lower is "
          f"better); floor: {n} real training digits score {floor:.2f}; acc: the classifier "
          f"agrees with the label.")
    _say("CPU s: wall time of the sampling loop on this CPU, not a performance number (pyops' "
          "kernels target GPUs; on CPU the FP8 path runs the PyTorch reference ops, slower).")
    for note in dict.fromkeys(r.note for r in results if r.note):
        print(f"pyops.patch: {note}")

    print("\none forward (sigma 0.5) with quantized linears vs fp32:")
    for line in _weight_table(m, noise, labels):
        print(line)

    png = Path(out) / "demo.png"
    why = write_png(png, panels, rows)
    if why is None:
        print(f"\nsamples: {png}  (rows: real digits, then each way; {rows} rows x 10 classes)")
    else:
        print(f"\nsamples: no PNG ({why})")
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0
