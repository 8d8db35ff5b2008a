"""A small diffusers Flux transformer trained on real images, for measuring caching honestly.

Step-to-step similarity, the thing every cache exploits, is a property of a *trained* model's
sampling trajectory: with random weights nothing is ever skipped. No weights can be downloaded
here, so this module trains one on data that ships inside scikit-learn: its 1,797 handwritten
digits (``sklearn.datasets.load_digits``, 8×8 pixels, 16 grey levels; the UCI "Optical
Recognition of Handwritten Digits" test set), as they are (8×8) or upsampled to 16×16.

* The model is a stock ``diffusers.FluxTransformer2DModel`` (reduced size), so diffusers' own
  caches (``FirstBlockCacheConfig``, ...) and cache-dit apply to it unchanged.
* Images are packed like Flux latents: 2×2 pixel patches (16 or 64 tokens of 4 channels),
  position ids (0, row, col). Conditioning is the digit class (10 = none, for classifier-free guidance): a
  fixed random "text" embedding per class (``txt_tokens`` × ``joint_dim``) and pooled vector.
* Training: rectified flow (Liu et al. 2022; the objective of SD3 and Flux),
  x_σ = (1 − σ)·x0 + σ·ε, target velocity ε − x0, σ ~ logit-normal(0, 1) (Esser et al. 2024,
  "Scaling Rectified Flow Transformers", §3.1), label dropout 10 % (classifier-free guidance,
  Ho & Salimans 2022), AdamW, an exponential moving average of the weights (the model returned).
* Quality without a download: :meth:`TrainedFlux.frechet_distance` is a Fréchet distance
  (Heusel et al. 2017, the FID formula) in the 64-d feature space of a small MLP classifier
  trained on the same training split; the held-out 20 % of the digits is the real reference.

``trained_flux(preset)`` trains once and caches the weights on disk (``$PYOPS_CACHE_DIR``, default
``~/.cache/pyops``; the file also holds the held-out split, so a machine that has it needs no
scikit-learn); a missing or corrupt file is retrained. Training is deterministic under the seed
on one machine and torch version. Presets: ``"quick"`` (tests, the CPU demo, the CPU study) and
``"study"`` (bench/bench_cache.py on a GPU).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import frechet_distance, psnr, rel_l1

__all__ = ["TrainConfig", "PRESETS", "TrainedFlux", "trained_flux", "cache_dir", "model_path",
           "digits", "frechet_distance", "psnr", "rel_l1"]

FORMAT_VERSION = 1  # bump when the data, packing or training code changes what a file holds
NULL_CLASS = 10


@dataclass(frozen=True)
class TrainConfig:
    """Size and training schedule of a :class:`TrainedFlux`.

    layers / single_layers: Flux double- / single-stream blocks; heads × head_dim: width;
    txt_tokens × joint_dim, pooled_dim: the class conditioning; size: image side in pixels
    (digits are upsampled bilinearly from 8); patch: pixels per token side; train_steps, batch,
    lr: AdamW schedule (cosine decay to 10 %); ema: EMA decay of the returned weights;
    classifier_steps: training steps of the feature classifier; seed: everything random.
    """
    layers: int = 2
    single_layers: int = 2
    heads: int = 2
    head_dim: int = 32
    txt_tokens: int = 2
    joint_dim: int = 32
    pooled_dim: int = 32
    size: int = 16
    patch: int = 2
    train_steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    ema: float = 0.995
    label_dropout: float = 0.1
    classifier_steps: int = 400
    seed: int = 0

    @property
    def tokens(self) -> int:
        return (self.size // self.patch) ** 2

    @property
    def channels(self) -> int:
        return self.patch * self.patch


PRESETS = {
    # 8×8 digits, 16 tokens; trained in 44-51 s on 2 CPU cores (torch 2.13, measured)
    "quick": TrainConfig(size=8, train_steps=600),
    # 16×16 digits, 64 tokens, 1.5× wider, 6 blocks: meant for a GPU (tens of minutes on 2 cores)
    "study": TrainConfig(layers=2, single_layers=4, heads=3, head_dim=32, txt_tokens=4,
                         joint_dim=64, pooled_dim=64, train_steps=1500, batch=64, lr=1e-3,
                         ema=0.998),
}


def cache_dir() -> Path:
    """Where trained weights are kept: ``$PYOPS_CACHE_DIR`` or ``~/.cache/pyops``."""
    return Path(os.environ.get("PYOPS_CACHE_DIR") or Path.home() / ".cache" / "pyops")


# ---- data ---------------------------------------------------------------------------------------
def digits(size: int = 8, seed: int = 0):
    """(train images, train labels, test images, test labels): images (N, 1, size, size) fp32 in
    [−1, 1]; a seeded 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is in the test and bench extras
        raise ImportError("pyops.models.digits needs scikit-learn (its bundled digits data): "
                          "pip install scikit-learn") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 12345))
    n_test = len(x) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def pack(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 1, H, W) → (B, (H/p)·(W/p), p²) tokens, row-major patches (Flux's latent packing)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpack(tokens: torch.Tensor, patch: int) -> torch.Tensor:
    """Inverse of :func:`pack` for one image channel."""
    B, L, _ = tokens.shape
    s = int(round(math.sqrt(L)))
    x = tokens.reshape(B, s, s, 1, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, 1, s * patch, s * patch)


def _ids(c: TrainConfig, device) -> tuple:
    """Flux position ids: txt_ids (txt_tokens, 3) zeros, img_ids (tokens, 3) = (0, row, col)."""
    s = float(c.size // c.patch)
    img = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(s), torch.arange(s),
                                     indexing="ij"), -1).reshape(-1, 3)
    return torch.zeros(c.txt_tokens, 3, device=device), img.to(device)


class _Classifier(nn.Module):
    """The feature network of the Fréchet distance: pixels → 128 → 64 (features) → 10."""

    def __init__(self, size: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(size * size, 128), nn.GELU(),
                                  nn.Linear(128, 64), nn.GELU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


# ---- the model ----------------------------------------------------------------------------------
class TrainedFlux:
    """A trained small ``FluxTransformer2DModel`` with its conditioning, data and metrics.

    transformer: the diffusers model (eval, fp32, CPU unless moved with :meth:`to`);
    config: its :class:`TrainConfig`; info: training facts (seconds, final loss, test accuracy of
    the feature classifier).
    """

    def __init__(self, config: TrainConfig, transformer, classifier: _Classifier,
                 cond_table: torch.Tensor, pooled_table: torch.Tensor, info: dict,
                 test: Optional[tuple] = None):
        self.config, self.transformer, self.classifier = config, transformer, classifier
        self.cond_table, self.pooled_table, self.info = cond_table, pooled_table, info
        # the held-out split (also stored in the weights file: no scikit-learn needed to load)
        self.test_images, self.test_labels = test or digits(config.size, config.seed)[2:]

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device=None, dtype=None) -> "TrainedFlux":
        """Move the transformer (and the conditioning tables) in place; returns self."""
        self.transformer.to(device=device, dtype=dtype)
        self.cond_table = self.cond_table.to(device=device, dtype=dtype)
        self.pooled_table = self.pooled_table.to(device=device, dtype=dtype)
        return self

    def noise(self, n: int, seed: int = 0) -> torch.Tensor:
        """(n, tokens, channels) fp32 standard normal noise on the model's device, seeded."""
        g, c = torch.Generator().manual_seed(seed), self.config
        return torch.randn(n, c.tokens, c.channels, generator=g).to(self.device)

    def cond(self, labels) -> dict:
        """Keyword arguments of the transformer for class ``labels`` ((B,) int, 0–9, or 10 = no
        class): ``encoder_hidden_states`` (B, txt_tokens, joint_dim), ``pooled_projections``,
        ``txt_ids``, ``img_ids``."""
        labels = torch.as_tensor(labels, dtype=torch.int64).to(self.cond_table.device)
        txt_ids, img_ids = _ids(self.config, self.device)
        return dict(encoder_hidden_states=self.cond_table[labels], txt_ids=txt_ids,
                    pooled_projections=self.pooled_table[labels], img_ids=img_ids)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, labels, model=None) -> torch.Tensor:
        """One forward: the predicted velocity ε − x0 at noise level ``sigma`` ((B,) or scalar,
        in [0, 1]); ``model`` (default the transformer) may be a wrapped or patched copy."""
        m = model or self.transformer
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return m(hidden_states=x, timestep=sigma, return_dict=False, **self.cond(labels))[0]

    def sampler(self, steps: int, *, model=None, guidance: Optional[float] = None, shift=1.0):
        """A :class:`pyops.sampler.FewStepSampler` over ``steps`` flow-Euler steps (diffusers'
        ``FlowMatchEulerDiscreteScheduler`` schedule with ``shift``) calling ``model`` (default
        the transformer) the way the Flux pipeline does."""
        from ..sampler import FewStepSampler, diffusers_model, flow_schedule
        fn = diffusers_model(model or self.transformer, timestep_mode="flux")
        # two calls: Flux's position ids (txt_ids, img_ids) have no batch dimension, so the
        # sampler's batch-doubled CFG cannot concatenate them
        return FewStepSampler(fn, flow_schedule(steps, shift=shift), guidance=guidance,
                              cfg="two_calls")

    def sample(self, noise: torch.Tensor, labels, steps: int = 28, *, model=None,
               guidance: Optional[float] = None, callback=None) -> torch.Tensor:
        """Generate from ``noise`` (n, tokens, channels) for class ``labels``: flow Euler over
        ``steps`` steps, CFG with the null class when ``guidance`` is set. Returns the fp32
        latent tokens (n, tokens, channels); :meth:`images` turns them into pixels."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        s = self.sampler(steps, model=model, guidance=guidance)
        unc = self.cond(torch.full_like(labels, NULL_CLASS)) if guidance else None
        with torch.no_grad():
            return s.sample(noise.shape, noise=noise, cond=self.cond(labels), uncond=unc,
                            callback=callback)

    def images(self, tokens: torch.Tensor) -> torch.Tensor:
        """Latent tokens → (n, 1, size, size) images, clamped to [−1, 1]."""
        return unpack(tokens.float(), self.config.patch).clamp(-1, 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 64) classifier features of images (n, 1, size, size) in [−1, 1]."""
        with torch.no_grad():
            return self.classifier.body(images.float().cpu())

    def frechet_distance(self, images: torch.Tensor) -> float:
        """Fréchet distance between ``images`` and the held-out real digits (359 images) in the
        classifier's feature space (lower is better; a second real sample of the same size scores
        the floor set by sampling noise)."""
        return frechet_distance(self.features(images), self.features(self.test_images))

    def accuracy(self, images: torch.Tensor, labels) -> float:
        """Fraction of ``images`` the classifier assigns to ``labels`` (class adherence)."""
        with torch.no_grad():
            pred = self.classifier(images.float().cpu()).argmax(-1)
        return float((pred == torch.as_tensor(labels).cpu()).float().mean())


def _build(c: TrainConfig):
    from diffusers import FluxTransformer2DModel
    a = c.head_dim // 4 * 2  # rope axes (id, row, col): sum = head_dim, row = col, all even
    rope = (c.head_dim - 2 * a, a, a)
    return FluxTransformer2DModel(patch_size=1, in_channels=c.channels, num_layers=c.layers,
                                  num_single_layers=c.single_layers, attention_head_dim=c.head_dim,
                                  num_attention_heads=c.heads, joint_attention_dim=c.joint_dim,
                                  pooled_projection_dim=c.pooled_dim, axes_dims_rope=rope)


def _key(c: TrainConfig, device: str) -> str:
    blob = json.dumps({"config": asdict(c), "format": FORMAT_VERSION, "device": device,
                       "torch": torch.__version__.split("+")[0].rsplit(".", 1)[0]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def train(c: TrainConfig, *, device="cpu", progress: bool = False):
    """Train a :class:`TrainedFlux` from scratch on ``device`` (deterministic under ``c.seed``:
    every random draw comes from a CPU generator). Returns it on the CPU."""
    t0 = time.perf_counter()
    dev = torch.device(device)
    xtr, ytr, xte, yte = digits(c.size, c.seed)
    torch.manual_seed(c.seed)
    g = torch.Generator().manual_seed(c.seed)
    # classifier first (features for the Fréchet distance)
    clf = _Classifier(c.size)
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(c.classifier_steps):
        i = torch.randint(0, len(xtr), (128,), generator=g)
        noisy = xtr[i] + 0.05 * torch.randn(xtr[i].shape, generator=g)
        loss = F.cross_entropy(clf(noisy), ytr[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(xte).argmax(-1) == yte).float().mean())
    model = _build(c).to(dev)
    cond_table = torch.randn(NULL_CLASS + 1, c.txt_tokens, c.joint_dim, generator=g)
    pooled_table = torch.randn(NULL_CLASS + 1, c.pooled_dim, generator=g)
    cond_table[NULL_CLASS] = 0
    pooled_table[NULL_CLASS] = 0
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / c.train_steps, 1))))
    xtr_tok = pack(xtr, c.patch)
    txt_ids, ids = _ids(c, dev)
    ctab, ptab = cond_table.to(dev), pooled_table.to(dev)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=c.train_steps, desc=f"training the digits Flux", leave=False)
        except ImportError:
            bar = None
    model.train()
    losses = []
    for step in range(c.train_steps):
        i = torch.randint(0, len(xtr_tok), (c.batch,), generator=g)
        x0 = xtr_tok[i]
        y = ytr[i].clone()
        y[torch.rand(c.batch, generator=g) < c.label_dropout] = NULL_CLASS
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(c.batch, generator=g))
        xs = ((1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps).to(dev)
        x0, eps, sigma, y = x0.to(dev), eps.to(dev), sigma.to(dev), y.to(dev)
        v = model(hidden_states=xs, timestep=sigma, encoder_hidden_states=ctab[y],
                  pooled_projections=ptab[y], txt_ids=txt_ids, img_ids=ids,
                  return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        d = min(c.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    ema[k].mul_(d).add_(p.detach(), alpha=1 - d)
                else:
                    ema[k].copy_(p)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    if bar is not None:
        bar.close()
    model.load_state_dict(ema)
    model.cpu()
    model.eval().requires_grad_(False)
    clf.requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10):]
    info = dict(seconds=time.perf_counter() - t0, final_loss=sum(tail) / len(tail),
                classifier_test_accuracy=acc, torch=torch.__version__, device=str(dev))
    return TrainedFlux(c, model, clf, cond_table, pooled_table, info, (xte, yte))


def _save(m: TrainedFlux, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(dict(transformer=m.transformer.state_dict(), classifier=m.classifier.state_dict(),
                    cond_table=m.cond_table, pooled_table=m.pooled_table,
                    info=json.dumps(m.info), test_images=m.test_images,
                    test_labels=m.test_labels), tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one


def _config(preset: Union[str, TrainConfig], overrides: dict) -> TrainConfig:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"trained_flux: unknown preset {preset!r}; expected one of "
                             f"{sorted(PRESETS)}")
        preset = PRESETS[preset]
    return replace(preset, **overrides) if overrides else preset


def model_path(preset: Union[str, TrainConfig] = "quick", train_device="cpu",
               **overrides) -> Path:
    """The file :func:`trained_flux` reads and writes for these arguments (it may not exist)."""
    c = _config(preset, overrides)
    return cache_dir() / f"flux-digits-{_key(c, torch.device(train_device).type)}.pt"


def trained_flux(preset: Union[str, TrainConfig] = "quick", *, device=None,
                 train_device="cpu", retrain: bool = False, progress: bool = False,
                 cache: bool = True, **overrides) -> TrainedFlux:
    """The digits-trained Flux transformer of ``preset`` (``"quick"``, ``"study"`` or a
    :class:`TrainConfig`; keyword ``overrides`` replace config fields), loaded from
    :func:`cache_dir` or trained on the CPU and saved there (``cache=False``: neither read nor
    write). ``device``: where to move it; ``train_device``: where to train it when no cached
    file exists (weights trained on a GPU differ in the last bits from CPU-trained ones, so each
    device type has its own file). Needs diffusers, and scikit-learn unless the file exists.

    Raises ``ValueError`` for an unknown preset name.
    """
    c = _config(preset, overrides)
    train_device = torch.device(train_device)
    path = model_path(c, train_device)
    m = None
    if cache and not retrain and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = _build(c)
            model.load_state_dict(blob["transformer"])
            model.eval().requires_grad_(False)
            clf = _Classifier(c.size)
            clf.load_state_dict(blob["classifier"])
            clf.eval().requires_grad_(False)
            test = ((blob["test_images"], blob["test_labels"]) if "test_images" in blob
                    else None)
            m = TrainedFlux(c, model, clf, blob["cond_table"], blob["pooled_table"],
                            json.loads(blob["info"]), test)
        except Exception:  # noqa: BLE001 - a corrupt or incompatible file is retrained
            m = None
    if m is None:
        m = train(c, device=train_device, progress=progress)
        if cache:
            _save(m, path)
    elif "test_images" not in blob:  # written before files held the test split: add it
        _save(m, path)
    if device is not None:
        m.to(device)
    return m
