"""The CPU demo (README's main job without a GPU) and `python -m pyops info` run and say
something meaningful."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyops
from pyops import __main__ as cli
from pyops import demo
from pyops.models import DiT, DiTConfig

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("uncached", "cached", "fp8 linears", "fp8 + cached", "few steps")


def _table(out: str) -> dict:
    """{way: {column: float or None}} from the demo's printed table ('-' -> None)."""
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("way "))
    rows = {}
    for ln in lines[head + 2:]:
        if not ln.strip():
            break
        name = next(w for w in sorted(WAYS, key=len, reverse=True) if ln.startswith(w))
        cells = ln[len(name):].split()
        cols = ("steps", "skipped", "rel L1", "PSNR", "FD", "acc", "s")
        rows[name] = {c: (None if v == "-" else float(v.rstrip("%")) / (100 if v.endswith("%")
                                                                       else 1))
                      for c, v in zip(cols, cells)}
    return rows


def _has(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


needs_deps = pytest.mark.skipif(not (_has("diffusers") and _has("sklearn")),
                                reason="the demo's model needs diffusers and scikit-learn")


@needs_deps
def test_demo_shows_real_samples(tmp_path, capsys):
    """The demo on a small sample count: every way's row, the cache skips at negligible error,
    FP8 changes the samples a little and keeps their distribution, the samples are digits of the
    asked class, and the PNG is written where it says."""
    assert demo.main(seed=0, out=str(tmp_path), n=20, rows=1, threads=1) == 0
    out = capsys.readouterr().out
    t = _table(out)
    assert set(t) == set(WAYS), out
    assert [t[w]["steps"] for w in WAYS] == [28, 28, 28, 28, 4]
    assert t["uncached"]["skipped"] is None and t["uncached"]["rel L1"] is None
    assert t["fp8 linears"]["skipped"] is None and t["few steps"]["skipped"] is None
    # the cache at CacheConfig's defaults skips something, and changes the images very little
    # (issue #14's bar: rel L1 <= 0.05 vs uncached)
    assert t["cached"]["skipped"] > 0 and t["fp8 + cached"]["skipped"] > 0
    assert 0 < t["cached"]["rel L1"] <= 0.05 and t["cached"]["PSNR"] > 30
    # FP8 linears: a small, nonzero change; the distribution stays (FD within 1.5x uncached)
    assert 0 < t["fp8 linears"]["rel L1"] <= 0.05
    assert t["fp8 linears"]["FD"] <= 1.5 * t["uncached"]["FD"]
    assert t["fp8 + cached"]["FD"] <= 1.5 * t["uncached"]["FD"]
    # few steps: a different trajectory (not a copy of the reference), still digits
    assert t["few steps"]["rel L1"] > t["cached"]["rel L1"]
    for w in WAYS:  # the trained model's samples are recognised as the asked digit
        assert t[w]["acc"] >= 0.8, (w, t[w])
    flat = " ".join(out.split())  # the prose is wrapped at 100 columns
    floor = float(re.search(r"floor: 20 real training digits score ([0-9.]+)", flat).group(1))
    assert 0 < floor < t["uncached"]["FD"] * 3
    png = tmp_path / "demo.png"
    assert f"samples: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"pyops.patch: linears: \d+ quantized", out)
    assert re.search(r"fp8 +\d+ linears +weight rel err 0\.0", out)
    assert "nvfp4" in out and "not a performance number" in flat


@needs_deps
def test_demo_without_matplotlib_skips_the_png(tmp_path, capsys, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert demo.main(out=str(tmp_path), n=10, rows=1, steps=2, few_steps=1, threads=1) == 0
    out = capsys.readouterr().out
    assert "samples: no PNG (matplotlib is not installed" in out
    assert not (tmp_path / "demo.png").exists()
    assert "done in" in out


def test_demo_missing_requirements_names_the_install_command(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert "scikit-learn" in demo.missing_requirements()
    assert demo.main(n=10, rows=1) == 1
    err = capsys.readouterr().err
    assert "scikit-learn" in err and 'pip install --no-build-isolation -e ".[bench]"' in err


def test_demo_bad_arguments_raise_before_any_work():
    for kw in (dict(n=19, rows=2), dict(rows=0), dict(steps=0), dict(few_steps=0),
               dict(threads=0), dict(preset="nope")):
        with pytest.raises(ValueError, match="pyops demo"):
            demo.main(**kw)
    with pytest.raises(SystemExit):  # argparse's error: usage + message, exit status 2
        cli.main(["demo", "-n", "5"])


def test_cli_turns_only_bad_arguments_into_a_usage_error(monkeypatch):
    """A ValueError from inside the run (a failing op, a metric) is a real error with its
    traceback, not argparse's usage message with exit status 2."""
    def boom(*a, **k):
        raise ValueError("an error inside the run")
    monkeypatch.setattr(demo, "_main", boom)
    with pytest.raises(ValueError, match="inside the run"):
        cli.main(["demo"])


def test_skipped_prefers_stats_and_falls_back_to_the_reuse_flags():
    class WithStats:
        stats = {"checks": 4, "hits": 1, "misses": 3, "skipped": 0.25}

    class Old:
        stats = {"checks": 4}  # the handle before it reported hits/misses

    assert demo._skipped(WithStats(), [1, 1, 0, 0]) == 0.25
    assert demo._skipped(Old(), [1, 1, 0, 0]) == 0.5
    assert demo._skipped(Old(), []) == 0.0


def test_pyops_and_the_demo_import_without_the_bench_packages():
    code = ("import sys\n"
            "for m in ('diffusers', 'sklearn', 'matplotlib', 'tqdm'): sys.modules[m] = None\n"
            "import pyops, pyops.demo, pyops.models.digits, pyops.__main__\n"
            "sys.exit(pyops.__main__.main(['demo']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "diffusers and scikit-learn" in r.stderr and ".[bench]" in r.stderr


def test_bench_extra_installs_what_the_demo_needs():
    """bench/run.sh installs '.[bench]' and then runs the demo on a CPU machine."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for kw in node.keywords if kw.arg == "extras_require")
    bench = {re.split(r"[<>=!;\[ ]", r)[0].lower() for r in ast.literal_eval(extras)["bench"]}
    needed = {pip for _, pip in demo.REQUIRED} | {"matplotlib", "tqdm"}
    assert needed <= bench, needed - bench


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
