"""pyops.cache on a *trained* model (pyops.models.digits, the quick preset): the defaults skip
steps at negligible quality loss, threshold 0 changes nothing, and the First-Block-Cache rule
decides exactly like diffusers' FirstBlockCacheConfig."""
import importlib.util

import pytest
import torch

import pyops
from pyops.models import digits as D

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("sklearn") is None,
    reason="needs diffusers and scikit-learn")

STEPS = 28
N = 100


@pytest.fixture(scope="module")
def setup():
    m = D.trained_flux("quick")
    noise, labels = m.noise(N, seed=11), torch.arange(N) % 10
    ref = m.sample(noise, labels, STEPS)
    return m, noise, labels, ref


def _cached(m, noise, labels, cfg):
    h = pyops.cache_model(m.transformer, cfg)
    reused = []
    try:
        out = m.sample(noise, labels, STEPS, callback=lambda i, *a: reused.append(
            int(h.regions()[-1].reuse[0])))
    finally:
        h.remove()
    return out, reused


def test_default_config_skips_a_third_of_the_steps_at_negligible_loss(setup):
    """The README's configuration (CacheConfig defaults, num_steps set): >= 30 % of the 28
    forwards skip their gated blocks, the final latents stay within 5 % relative L1 of the
    uncached ones and the sample quality (Fréchet distance to held-out digits) within 5 %."""
    m, noise, labels, ref = setup
    out, reused = _cached(m, noise, labels, pyops.CacheConfig(num_steps=STEPS))
    skipped = sum(reused) / STEPS
    err = D.rel_l1(out, ref)
    assert skipped >= 0.30, (skipped, reused)
    assert err <= 0.05, err
    fd_ref, fd = m.frechet_distance(m.images(ref)), m.frechet_distance(m.images(out))
    assert fd <= 1.05 * fd_ref + 0.1, (fd, fd_ref)
    # the default's protected steps: the first (warm-up) and the last are always computed
    assert reused[0] == 0 and reused[-1] == 0


def test_threshold_zero_is_bit_identical(setup):
    m, noise, labels, ref = setup
    out, reused = _cached(m, noise, labels, pyops.CacheConfig(threshold=0.0, num_steps=STEPS))
    assert sum(reused) == 0
    assert torch.equal(out, ref)


@pytest.mark.parametrize("threshold", [0.1, 0.2])
def test_same_steps_skipped_as_diffusers_first_block_cache(setup, threshold):
    """Same rule (relative L1 of the first block's residual against the last computed step),
    same threshold: pyops and diffusers' FirstBlockCache skip the same steps, and the outputs
    agree to rounding (both add the cached residual of the same computed step)."""
    FirstBlockCacheConfig = getattr(pytest.importorskip("diffusers"), "FirstBlockCacheConfig",
                                    None)
    if FirstBlockCacheConfig is None:
        pytest.skip("the installed diffusers has no FirstBlockCacheConfig")
    m, noise, labels, ref = setup
    cfg = pyops.CacheConfig(level="step", threshold=threshold, warmup=1, last_steps=0, fn=1,
                            bn=0, num_steps=STEPS)
    out, reused = _cached(m, noise, labels, cfg)
    model = m.transformer
    # a submodule of the second block runs only when the gated blocks compute
    computed = []
    hook = model.transformer_blocks[1].norm1.register_forward_pre_hook(
        lambda *a: computed.append(1))
    step_computed = []
    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        with model.cache_context("cond"):
            theirs = m.sample(noise, labels, STEPS, callback=lambda i, *a: (
                step_computed.append(len(computed)), computed.clear()))
    finally:
        hook.remove()
        model.disable_cache()
    their_reused = [1 - c for c in step_computed]
    assert 0 < sum(reused) < STEPS - 1, reused  # a threshold that decides something
    assert reused == their_reused
    torch.testing.assert_close(out, theirs, rtol=1e-4, atol=1e-4)


class _DigitsPipe:
    """A stand-in for a diffusers pipeline over the trained model: ``pipe(prompt,
    num_inference_steps=n)`` samples one digit (the first digit in the prompt) in n flow Euler
    steps through whatever module ``pipe.transformer`` holds; returns ``.images``."""

    def __init__(self, m):
        self.m, self.transformer = m, m.transformer

    def __call__(self, prompt, num_inference_steps):
        import types
        label = int(next(ch for ch in prompt if ch.isdigit()))
        tokens = self.m.sample(self.m.noise(1, seed=label), [label], num_inference_steps,
                               model=self.transformer)
        return types.SimpleNamespace(images=[self.m.images(tokens)[0]])


def test_readme_snippet_as_written_skips_a_third_on_the_trained_model(setup, capsys):
    """Issue #14's bar for the README example: a user who copies it onto a trained model sees
    skips at negligible loss. The snippet runs as written on a pipeline over the digits Flux;
    the share it prints is >= 0.30 and the image stays within 5 % relative L1 of uncached."""
    import re
    from pathlib import Path
    m = setup[0]
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                   if "pyops.cache_model(" in b)
    pipe = _DigitsPipe(m)
    want = pipe("a handwritten 7", num_inference_steps=STEPS).images[0]
    capsys.readouterr()
    ns = {"pyops": pyops, "pipe": pipe, "prompt": "a handwritten 7"}
    exec(compile(snippet, "README.md", "exec"), ns)
    printed = float(capsys.readouterr().out)
    assert printed >= 0.30, printed
    assert D.rel_l1(ns["image"], want) <= 0.05
