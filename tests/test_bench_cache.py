"""bench/bench_cache.py: the caching study on the trained digits Flux, as a CPU smoke run.

One ``--quick`` run on the CPU (the "quick" preset, loaded from ~/.cache/pyops or trained there
first) and checks of what it wrote: every method has a row with numbers or a note, threshold 0
reproduces the uncached images bit for bit, pyops with the First-Block-Cache rule skips what
diffusers' FirstBlockCache skips, the quality columns are numbers, no time is reported on a CPU,
the matched-quality table agrees with the rows, and the plot exists.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _bench():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_cache")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_cache")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, str(BENCH / "bench_cache.py"), "--quick", "--device",
                        "cpu", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((out / "cache.json").read_text())
    return out, data, r.stdout


def _measured(r):
    return r.get("skipped") is not None


def test_every_method_has_numbers_or_a_note(quick):
    B = _bench()
    _, data, _ = quick
    rows = data["tables"][0]["rows"]
    import diffusers
    must_run = {B.M_UNC, B.M_STEP, B.M_BLOCK}
    must_run |= {m for m, cls in B.DIFFUSERS_CONFIG.items() if hasattr(diffusers, cls)}
    if importlib.util.find_spec("cache_dit") is not None:
        must_run.add(B.M_CDIT)
    for m in B.METHODS:
        mine = [r for r in rows if r["method"] == m]
        assert mine, f"no row for {m}"
        for r in mine:
            assert "error" not in (r.get("note") or ""), r
            assert _measured(r) or r.get("note"), r  # numbers, or why not
            if m in must_run:
                assert _measured(r), r
    for m in (B.M_GRAPH, B.M_UNC_GRAPH):  # CUDA only: noted on a CPU, never faked
        assert all(not _measured(r) and "CUDA" in r["note"] for r in rows if r["method"] == m)
    chunk = [r for r in rows if r["method"] == B.M_CHUNK]
    assert all("not applicable" in r["note"] for r in chunk)


def test_threshold_zero_is_bit_identical(quick):
    B = _bench()
    rows = quick[1]["tables"][0]["rows"]
    zero = [r for r in rows if r.get("threshold") == 0.0 and _measured(r)]
    assert {B.M_STEP, B.M_FBC} <= {r["method"] for r in zero}
    for r in zero:
        assert r["rel L1"] == 0.0 and r["skipped"] == 0.0 and r["attn skipped"] == 0.0, r
        assert r["PSNR"] == math.inf, r


def test_pyops_fbc_rule_skips_what_diffusers_fbc_skips(quick):
    B = _bench()
    rows = quick[1]["tables"][0]["rows"]
    fbc = {(r["steps"], r["threshold"]): r for r in rows
           if r["method"] == B.M_FBC and _measured(r)}
    pairs = [(r, fbc[(r["steps"], r["threshold"])]) for r in rows
             if r["method"] == B.M_STEP and r.get("fbc rule") and _measured(r)
             and (r["steps"], r["threshold"]) in fbc]
    assert any(p["threshold"] > 0 and p["skipped"] > 0 for p, _ in pairs), pairs  # not vacuous
    for p, d in pairs:
        assert p["skipped"] == d["skipped"] and p["attn skipped"] == d["attn skipped"], (p, d)


def test_quality_columns_are_numbers_and_no_cpu_times(quick):
    rows = quick[1]["tables"][0]["rows"]
    measured = [r for r in rows if _measured(r)]
    assert len(measured) >= 8
    for r in measured:
        for k in ("skipped", "attn skipped", "rel L1", "FD"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r)
        assert 0.0 <= r["skipped"] <= 1.0 and 0.0 <= r["attn skipped"] <= 1.0
        assert r["FD"] > 0
        assert isinstance(r["PSNR"], float) and (math.isfinite(r["PSNR"]) or r["rel L1"] == 0)
    # some cache really skips and really changes the images (the checks above are not vacuous)
    assert any(r["skipped"] > 0.2 and 0 < r["rel L1"] < 0.2 for r in measured)
    # CPU times are no performance numbers: never reported
    assert all(r.get("s") is None and r.get("speed-up") is None for r in rows)


def test_matched_quality_table_agrees_with_the_rows(quick):
    B = _bench()
    tables = quick[1]["tables"]
    rows = tables[0]["rows"]
    head = [t for t in tables if "matched quality" in t["title"].lower()]
    assert len(head) == 1
    ref_fd = {r["steps"]: r["FD"] for r in rows if r["method"] == B.M_UNC}
    for r in rows:  # the column follows the stated rule
        if _measured(r):
            want = r["rel L1"] <= B.TOL_REL_L1 and r["FD"] <= B.TOL_FD_RATIO * ref_fd[r["steps"]]
            assert r["matched"] == want, r
    by = {(h["steps"], h["method"]): h for h in head[0]["rows"]}
    methods = {(r["steps"], r["method"]) for r in rows if r["method"] != B.M_UNC}
    assert set(by) == methods
    for key, h in by.items():
        ok = [r for r in rows if (r["steps"], r["method"]) == key and _measured(r)
              and r["matched"]]
        if ok:
            assert h["max skipped"] == max(r["skipped"] for r in ok), h
            assert h["max attn skipped"] == max(r["attn skipped"] for r in ok), h
        else:
            assert h.get("max skipped") is None, h
    assert by[(28, B.M_STEP)]["max skipped"] > 0  # pyops skips something at matched quality
    md = (quick[0] / "cache.md").read_text()
    assert "At matched quality" in md and B.MATCH_RULE in md


def test_plot_written_when_matplotlib_is_there(quick):
    out, data, _ = quick
    png = out / "cache.png"
    notes = data["tables"][0]["notes"]
    if importlib.util.find_spec("matplotlib") is None:
        assert not png.exists() and any(n.startswith("no PNG") for n in notes)
        return
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot: cache.png" in notes


def test_run_sizes():
    """Every method in every run size; pyops' First-Block-Cache-rule rows and diffusers FBC at
    the same thresholds; the default run is 28 steps, --full adds 50."""
    B = _bench()
    for mode in ("quick", "default", "full"):
        steps, cfgs = B.select(mode)
        assert steps == ([28, 50] if mode == "full" else [28])
        assert cfgs[0].method == B.M_UNC and {c.method for c in cfgs} == set(B.METHODS)
        ours = sorted(c.threshold for c in cfgs if c.method == B.M_STEP and c.fbc_rule)
        theirs = sorted(c.threshold for c in cfgs if c.method == B.M_FBC)
        assert ours == theirs and 0.0 in ours and max(ours) > 0
    _, cfgs = B.select("default", thresholds="0.1,0.2")
    assert sorted(c.threshold for c in cfgs if c.method == B.M_FBC) == [0.1, 0.2]


def test_a_failing_method_gives_a_note_row(monkeypatch, one_thread):
    """A method that raises becomes a row with the error in its note and no numbers; the model
    is checked to be restored after it."""
    B = _bench()
    from pyops.models import digits as D
    tm = D.trained_flux("quick")
    n_blocks = len(tm.transformer.transformer_blocks) + len(
        tm.transformer.single_transformer_blocks)
    ctx = B.Ctx(tm, torch.device("cpu"), 3, tm.noise(10, seed=0), torch.arange(10) % 10, n_blocks)
    ctx.probe_out = ctx.probe()
    ref = B.run_row(ctx, B.Cfg(B.M_UNC, ""))
    assert ref["skipped"] == 0.0 and ref["rel L1"] == 0.0 and ctx.ref_fd == ref["FD"]

    def broken(ctx, cfg):
        raise RuntimeError("boom")
    monkeypatch.setattr(B, "provider", broken)
    row = B.run_row(ctx, B._fbc(0.3))
    assert row["note"].startswith("error: RuntimeError: boom") and not _measured(row)
    assert row.get("rel L1") is None and row.get("FD") is None

    # a method whose removal leaves the model changed is flagged
    def leaky(ctx, cfg):
        tm.transformer.proj_out.bias.data.add_(1.0)
        return B.contextlib.nullcontext((ctx.sample, None))
    monkeypatch.setattr(B, "provider", leaky)
    try:
        row = B.run_row(ctx, B._fbc(0.3))
    finally:
        tm.transformer.proj_out.bias.data.sub_(1.0)
    assert "NOT restored" in row["note"]


def test_a_method_that_changes_the_model_without_changing_its_output_is_flagged(monkeypatch,
                                                                                one_thread):
    """What cache-dit left behind computes the same forward, so the one-forward check cannot
    see it; the structure check does: children re-registered in another order (diffusers' FBC
    and MagCache pick their head and tail blocks in that order) and an instance ``forward``
    left behind. With an untouched copy at hand the bench replaces the model, and the next row
    is clean. What diffusers' own removal leaves (each block's ``forward`` bound from the class,
    an empty hook registry, ``_cache_config = None``) is no change."""
    import copy
    import functools
    B = _bench()
    from pyops.models import digits as D
    tm = D.trained_flux("quick")
    m = tm.transformer
    n_blocks = len(m.transformer_blocks) + len(m.single_transformer_blocks)
    ctx = B.Ctx(tm, torch.device("cpu"), 2, tm.noise(4, seed=0), torch.arange(4) % 10, n_blocks,
                pristine=copy.deepcopy(m))
    ctx.probe_out = ctx.probe()
    B.run_row(ctx, B.Cfg(B.M_UNC, ""))
    order = list(m._modules)
    real = B.provider

    def reorder(ctx, cfg):  # what unittest.mock.patch.object does to a child on exit
        blocks = ctx.shared.transformer_blocks
        delattr(ctx.shared, "transformer_blocks")
        ctx.shared.transformer_blocks = blocks
        return B.contextlib.nullcontext((ctx.sample, None))

    def forward_left(ctx, cfg):
        ctx.shared.forward = functools.partial(type(ctx.shared).forward, ctx.shared)
        return B.contextlib.nullcontext((ctx.sample, None))

    def diffusers_leftovers(ctx, cfg):
        for b in list(ctx.shared.transformer_blocks) + list(ctx.shared.single_transformer_blocks):
            b.forward = b.forward  # a bound method of the class's forward, on the instance
        ctx.shared._cache_config = None
        ctx.shared.enable_cache(B._diffusers_cls(B.M_FBC)(threshold=0.1))
        ctx.shared.disable_cache()  # leaves empty hook registries
        return B.contextlib.nullcontext((ctx.sample, None))

    for leak, words in ((reorder, "children re-registered in another order"),
                        (forward_left, "attribute forward left behind")):
        monkeypatch.setattr(B, "provider", leak)
        before = tm.transformer
        row = B.run_row(ctx, B._fbc(0.3))
        assert _measured(row) and row["rel L1"] == 0.0, row  # the same images: one forward
        assert "structure is NOT restored" in row["note"] and words in row["note"], row
        assert "replaced it with a copy" in row["note"], row
        assert tm.transformer is not before and list(tm.transformer._modules) == order
        assert "forward" not in vars(tm.transformer)
        monkeypatch.setattr(B, "provider", real)
        clean = B.run_row(ctx, B._fbc(0.3))  # on the replacement: nothing to flag
        assert _measured(clean) and not clean.get("note"), clean

    monkeypatch.setattr(B, "provider", diffusers_leftovers)
    row = B.run_row(ctx, B._fbc(0.3))
    assert _measured(row) and not row.get("note"), row


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only contend with parallel test runs
    yield
    torch.set_num_threads(n)


def test_repeated_generations_are_identical(one_thread):
    """The timed generations (CUDA) repeat the counted one: every method resets its state
    between generations. Run here through the same path on the CPU (timed=True; these times
    are not reported anywhere)."""
    B = _bench()
    from pyops.models import digits as D
    tm = D.trained_flux("quick")
    n_blocks = len(tm.transformer.transformer_blocks) + len(
        tm.transformer.single_transformer_blocks)
    ctx = B.Ctx(tm, torch.device("cpu"), 6, tm.noise(10, seed=0), torch.arange(10) % 10, n_blocks)
    ctx.probe_out = ctx.probe()
    _, cfgs = B.select("quick")
    ran = set()
    for cfg in cfgs:
        if cfg.method in (B.M_GRAPH, B.M_UNC_GRAPH, B.M_CHUNK):
            continue
        row = B.run_row(ctx, cfg, timed=True)
        note = row.get("note") or ""
        if cfg.method == B.M_CDIT and "not importable" in note:
            continue
        assert _measured(row) and row["s"] > 0 and not note, row
        ran.add(cfg.method)
    assert {B.M_UNC, B.M_STEP, B.M_BLOCK, B.M_FBC} <= ran


class FakeCacheDit:
    """What cache-dit (1.5.3, read in its caching/cache_adapters/cache_adapter.py and
    caching/patch_functors/functor_flux.py) does to a bare Flux transformer, without its
    dependencies: ``enable_cache`` gives the model an instance ``forward`` (the Flux patch
    functor's copy of the class forward, ``_is_patched = True``) wrapped in one that swaps the
    block lists in with ``unittest.mock.patch.object`` on every call; leaving that patch deletes
    and re-adds the model's child, so the children's registration order changes
    (``single_transformer_blocks`` then ``transformer_blocks``, after ``proj_out``).
    ``disable_cache`` puts back the patch functor's forward, not the class one."""

    class DBCacheConfig:
        def __init__(self, **kw):
            self.kw = kw

    @staticmethod
    def enable_cache(model, cache_config):
        import contextlib
        from unittest import mock
        cls_forward = type(model).forward

        def patched(*a, **k):  # stands for cache-dit's copy of the Flux forward
            return cls_forward(model, *a, **k)

        def cached(*a, **k):
            with contextlib.ExitStack() as stack:
                for name in ("transformer_blocks", "single_transformer_blocks"):
                    stack.enter_context(mock.patch.object(model, name, getattr(model, name)))
                return patched(*a, **k)
        model._is_patched = True
        model._original_forward = patched
        model.forward = cached

    @staticmethod
    def disable_cache(model):
        model.forward = model._original_forward
        del model._original_forward


@pytest.mark.parametrize("impl", ["fake", "cache_dit"])
def test_cache_dit_leaves_the_model_of_the_other_methods_alone(impl, monkeypatch, tmp_path,
                                                               one_thread):
    """Two step counts in one run (like --full's 28 and 50): cache-dit runs last at the first
    and must not break diffusers' FirstBlockCache and MagCache at the second. cache-dit leaves
    the transformer's children re-registered in another order (and its own forward behind);
    diffusers picks the head and tail blocks of both caches in the children's order, so on the
    model cache-dit touched FBC's tail block ran before its head ("'NoneType' object is not
    subscriptable") and MagCache's calibration printed nothing. ``fake``: the same side effects
    without cache-dit (always runs); ``cache_dit``: the real package, where importable."""
    B = _bench()
    if impl == "fake":
        monkeypatch.setattr(B, "_import_cache_dit", lambda: FakeCacheDit)
    else:
        pytest.importorskip("cache_dit")
    rc = B.main(["--device", "cpu", "--preset", "quick", "--samples", "4", "--steps", "3,4",
                 "--thresholds", "0.3", "--methods", "FBC,MagCache,cache-dit",
                 "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "cache.json").read_text())["tables"][0]["rows"]
    for steps in (3, 4):
        for m in (B.M_FBC, B.M_MAG, B.M_CDIT):
            mine = [r for r in rows if r["steps"] == steps and r["method"] == m]
            assert mine, (steps, m)
            for r in mine:
                assert _measured(r) and not r.get("note"), r
