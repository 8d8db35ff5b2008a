"""pyops.models.digits: the digits-trained Flux transformer (the model the caching study and the
CPU demo run on), its disk cache, and its quality metrics."""
import importlib.util
import math

import pytest
import torch

from pyops.models import digits as D

needs_deps = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("sklearn") is None,
    reason="needs diffusers and scikit-learn")

# a config that trains in a second: determinism and cache mechanics, not quality
TINY = D.TrainConfig(size=8, layers=1, single_layers=1, heads=1, head_dim=16, txt_tokens=1,
                     joint_dim=8, pooled_dim=8, train_steps=4, batch=8, classifier_steps=3)


def test_pack_unpack_roundtrip_and_layout():
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = D.pack(x, 2)
    assert t.shape == (3, 16, 4)
    # token 1 = patch (row 0, col 1): pixels (0..1, 2..3), row-major inside the patch
    assert torch.equal(t[:, 1], x[:, 0, 0:2, 2:4].reshape(3, 4))
    assert torch.equal(D.unpack(t, 2), x)


def test_frechet_distance_closed_form():
    # the same set: 0; a shift by a vector d of every sample: |d|^2 (covariances equal)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 6, generator=g, dtype=torch.float64)
    assert abs(D.frechet_distance(f, f)) < 1e-8
    d = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64)
    assert math.isclose(D.frechet_distance(f, f + d), float(d @ d), rel_tol=1e-9)
    # non-commuting covariances: compare with the definition through matrix square roots
    a = torch.randn(400, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[2.0, 0.3, 0.0], [0.0, 1.0, 0.7], [0.1, 0.0, 0.5]], dtype=torch.float64)
    b = torch.randn(300, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[1.0, -0.8, 0.2], [0.4, 1.5, 0.0], [0.0, 0.3, 2.0]], dtype=torch.float64) + 0.7
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eig(s1 @ s2)  # tr((S1 S2)^1/2) = sum of sqrt of eigenvalues of S1 S2
    tr_sqrt = float(w.sqrt().real.sum())
    want = float((a.mean(0) - b.mean(0)).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)
    assert math.isclose(D.frechet_distance(a, b), want, rel_tol=1e-9, abs_tol=1e-9)


def test_psnr_and_rel_l1():
    x = torch.zeros(2, 1, 4, 4)
    y = x + 0.2
    assert math.isclose(D.psnr(y, x), 10 * math.log10(4 / 0.04), rel_tol=1e-6)
    assert D.psnr(x, x) == float("inf")
    assert math.isclose(D.rel_l1(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])), 0.5)


def test_metrics_reject_bad_input():
    """Mismatched shapes would broadcast to a wrong number (rel L1 0, a finite PSNR); fewer than
    two feature rows give a NaN covariance: clear errors instead."""
    with pytest.raises(ValueError, match="rel_l1: x .* and ref .* must have one shape"):
        D.rel_l1(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="psnr: x .* and ref .* must have one shape"):
        D.psnr(torch.zeros(4, 1), torch.ones(4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        D.frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="same feature size"):
        D.frechet_distance(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        D.frechet_distance(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="peak"):
        D.psnr(torch.zeros(2), torch.ones(2), peak=0.0)


@needs_deps
def test_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PYOPS_CACHE_DIR", str(tmp_path))
    a = D.trained_flux(TINY)
    files = list(tmp_path.glob("flux-digits-*.pt"))
    assert files == [D.model_path(TINY)]
    assert D.model_path(TINY, train_device="cuda") != files[0]  # GPU-trained weights differ
    b = D.trained_flux(TINY, cache=False)  # trained again from scratch
    for (ka, va), (kb, vb) in zip(a.transformer.state_dict().items(),
                                  b.transformer.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert torch.equal(a.cond_table, b.cond_table)
    c = D.trained_flux(TINY)  # loaded from the file
    assert c.info == a.info
    for va, vc in zip(a.transformer.state_dict().values(), c.transformer.state_dict().values()):
        assert torch.equal(va, vc)
    # another seed is another model (the seed reaches the weights)
    d = D.trained_flux(TINY, cache=False, seed=1)
    assert not torch.equal(next(iter(d.transformer.parameters())),
                           next(iter(a.transformer.parameters())))
    # a corrupt file is retrained and rewritten, not an error
    files[0].write_bytes(b"not a checkpoint")
    e = D.trained_flux(TINY)
    assert torch.equal(next(iter(e.transformer.parameters())),
                       next(iter(a.transformer.parameters())))
    assert files[0].stat().st_size > 1000


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        D.trained_flux("huge")


@pytest.fixture(scope="module")
def quick():
    if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("sklearn") is None:
        pytest.skip("needs diffusers and scikit-learn")
    return D.trained_flux("quick")


def test_quick_model_learned_the_digits(quick):
    """The quick model generates recognisable digits of the asked class: the feature classifier
    (98 % on real held-out digits) agrees with the label, and the Fréchet distance to held-out
    digits is far below that of noise or of an untrained model."""
    m = quick
    assert m.info["classifier_test_accuracy"] > 0.9
    n = 200
    noise, labels = m.noise(n, seed=7), torch.arange(n) % 10
    img = m.images(m.sample(noise, labels, steps=20))
    assert img.shape == (n, 1, 8, 8)
    acc, fd = m.accuracy(img, labels), m.frechet_distance(img)
    fd_noise = m.frechet_distance(torch.rand(n, 1, 8, 8) * 2 - 1)
    assert acc > 0.8, acc
    assert fd < 0.25 * fd_noise, (fd, fd_noise)
    # classifier-free guidance (null class 10) runs and keeps the class
    g = m.images(m.sample(noise[:20], labels[:20], steps=8, guidance=2.0))
    assert m.accuracy(g, labels[:20]) > 0.8


@needs_deps
def test_cached_file_loads_without_scikit_learn(tmp_path, monkeypatch):
    """The weights file carries the held-out split, so a machine that has the file (e.g. a GPU
    machine without internet) needs no scikit-learn; a file written without it gets it added."""
    import sys
    monkeypatch.setenv("PYOPS_CACHE_DIR", str(tmp_path))
    a = D.trained_flux(TINY)
    path = D.model_path(TINY)
    blob = torch.load(path, weights_only=True)
    assert torch.equal(blob["test_images"], a.test_images)
    del blob["test_images"], blob["test_labels"]  # a file from before the split was stored
    torch.save(blob, path)
    D.trained_flux(TINY)  # loads it (scikit-learn available) and adds the split
    assert "test_images" in torch.load(path, weights_only=True)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError):
        D.digits(8)
    b = D.trained_flux(TINY)
    assert torch.equal(b.test_images, a.test_images) and torch.equal(b.test_labels, a.test_labels)
    assert b.frechet_distance(b.test_images[:50]) >= 0.0
