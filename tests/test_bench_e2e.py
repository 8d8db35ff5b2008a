"""CPU tests of bench/bench_e2e.py, the whole-DiT end-to-end benchmark.

The quick run (tiny diffusers Flux and Wan, reference backends) runs as a subprocess with
TRITON_INTERPRET unset and no size flag, which on a CPU means ``--quick``; the test checks the
files it writes (table, JSON, PNG when matplotlib is installed), every provider's row, the
bf16-eager reference, the extrapolation label, the restore check after ``handle.remove()`` and
the few-step table. The CPU times mean nothing and are not checked.
"""
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _module():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("bench_e2e")
    finally:
        sys.path.remove(str(BENCH))


def _has(mod: str) -> bool:
    try:
        importlib.import_module(mod)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e_out")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(BENCH / "bench_e2e.py"), "--device", "cpu",
                        "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out, r.stdout, time.monotonic() - t0, r.stderr


def test_quick_says_first_that_cpu_times_are_no_performance_numbers(quick):
    stdout = quick[1]
    first = stdout.splitlines()[0]
    assert "NOT performance numbers" in first, stdout[:1000]
    assert "the speed numbers need a CUDA GPU" in stdout


def test_quick_writes_table_json_and_png(quick):
    out, stdout = quick[:2]
    md, js, png = out / "e2e.md", out / "e2e.json", out / "e2e.png"
    assert md.is_file() and js.is_file()
    data = json.loads(js.read_text())
    assert data["env"]["run"] == "quick"
    E = _module()
    titles = [t["title"] for t in data["tables"]]
    assert len(titles) == 2
    assert data["tables"][0]["columns"] == E.COLUMNS
    assert data["tables"][1]["columns"] == E.FEW_COLUMNS
    text = md.read_text()
    assert "| " + " | ".join(E.COLUMNS) + " |" in text
    if _has("matplotlib"):
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot {png}" in stdout
    else:
        assert not png.exists()
        assert "no PNG: matplotlib not importable" in text
        assert "no plot (matplotlib not importable" in stdout
    assert str(md) in stdout  # says where the table went


def test_quick_rows_for_every_model_and_provider(quick):
    out = quick[0]
    E = _module()
    data = json.loads((out / "e2e.json").read_text())
    rows = data["tables"][0]["rows"]
    models = [s.label for s in E.specs_for("quick")]
    assert [r["provider"] for r in rows] == list(E.PROVIDER_NAMES) * len(models)
    assert [r["model"] for r in rows] == [m for m in models for _ in E.PROVIDER_NAMES]
    patched = hasattr(__import__("pyops"), "patch")
    for r in rows:
        p = r["provider"]
        if "torch.compile" in p:  # not run on a CPU without --compile: blank, with the reason
            assert r.get("ms") is None and "not run on a CPU" in r["note"], r
            continue
        if p.startswith("pyops") and not patched:
            assert r.get("ms") is None and r["note"] == E.NEEDS_PATCH, r
            continue
        assert r["ms"] > 0 and r["ms/block"] > 0, r
        assert 0 < r["ms/block"] < r["ms"]
        assert r["warm-up s"] > 0 and r.get("peak GiB") is None  # no CUDA memory on a CPU
        # the tiny models run fewer blocks than their nominal depth: labelled extrapolation
        assert r["full-depth from"].startswith("extrapolated: ms x "), r
        assert r["full-depth ms"] > r["ms"]
        assert r["x bf16 eager"] > 0
        if p == "bf16 eager":
            assert r["cos"] == pytest.approx(1.0) and r["rel L1"] == 0.0
            assert r["x bf16 eager"] == 1.0
        else:
            # quantized: close to bf16, never identical
            assert 0.99 < r["cos"] <= 1.0 + 1e-6 and 0.0 < r["rel L1"] < 0.1, r
            assert r["note"].startswith("patch: ") and "linears" in r["note"], r
    notes = "\n".join(data["tables"][0]["notes"])
    assert "EXTRAPOLATED" in notes
    if patched:
        for m in models:
            assert (f"{m}: after the pyops rows (each undone by handle.remove()), the bf16 eager "
                    f"output is bit-identical to the first bf16 eager run") in notes, notes


def test_quick_few_step_table(quick):
    out = quick[0]
    E = _module()
    rows = json.loads((out / "e2e.json").read_text())["tables"][1]["rows"]
    assert [r["steps"] for r in rows] == [E.BASE_STEPS, E.FEW_STEPS, E.FEW_STEPS]
    base = rows[0]
    assert base["run"].startswith("bf16 eager") and base["ms"] > 0
    assert base["note"] == "measured loop" and base["x vs 50-step bf16"] == 1.0
    if not hasattr(__import__("pyops"), "patch"):
        assert all(r["note"] == E.NEEDS_PATCH for r in rows[1:])
        return
    for r in rows[1:]:
        assert r["ms"] > 0, r
        assert r["x vs 50-step bf16"] == pytest.approx(base["ms"] / r["ms"])
    assert "cache" not in rows[1]["run"] and "+ cache" in rows[2]["run"]
    done, total = map(int, rows[2]["reused steps"].split("/"))
    assert total == E.FEW_STEPS and 0 <= done <= total - 2  # warm-up and last step computed


def test_quick_progress_bar_counts_every_run(quick):
    E = _module()
    n = 2 * len(E.PROVIDERS) + 3  # two models' providers + the three few-step runs
    if _has("tqdm"):
        assert f"{n}/{n}" in quick[3], quick[3][-2000:]
    else:  # the plain fallback: one line per run
        assert f"[{n}/{n}] " in quick[3], quick[3][-2000:]


def test_quick_run_is_short(quick):
    """The quick run is the CPU pipeline check: well under a minute (measured ~17 s on a 2-core
    CPU including ~10 s of imports); 120 s leaves room for a loaded machine."""
    assert quick[2] < 120, quick[2]


def test_extrapolation_and_accuracy_helpers():
    E = _module()
    spec = E.flux_spec((2, 4))
    ms, how = E.extrapolate(10.0, spec)
    assert ms == pytest.approx(10.0 * 57 / 6) and how == "extrapolated: ms x 57/6"
    assert E.extrapolate(10.0, E.flux_spec((19, 38))) == (10.0, "measured")
    assert E.extrapolate(None, spec) == (None, None)
    assert spec.blocks_label() == "2+4 of 19+38 (double+single)"
    assert E.wan_spec((4,)).blocks_label() == "4 of 40"
    g = torch.Generator().manual_seed(0)
    b = torch.randn(1000, generator=g).to(torch.bfloat16)
    a = (b.double() + 0.01 * torch.randn(1000, generator=g, dtype=torch.float64)).to(
        torch.bfloat16)
    cos, rel = E.compare(a, b)
    ad, bd = a.double(), b.double()
    assert cos == pytest.approx(float(ad @ bd / (ad.norm() * bd.norm())), abs=1e-6)
    assert rel == pytest.approx(float((ad - bd).abs().sum() / bd.abs().sum()), rel=1e-5)
    assert E.compare(b, b) == (pytest.approx(1.0), 0.0)


def test_time_calls_counts_and_returns_the_last_output():
    E = _module()
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)
        return len(calls)
    ms, out = E.time_calls(fn, torch.device("cpu"), target_s=0.0, warmup=2, min_reps=3)
    assert len(calls) == 5 and out == 5 and ms >= 2.0
    calls.clear()
    ms, out = E.time_calls(fn, torch.device("cpu"), target_s=0.05, warmup=0, min_reps=1,
                           max_reps=4)
    assert 1 <= len(calls) <= 4 and out == len(calls)


def test_every_run_size_warms_up_before_timing():
    """Each provider row gets an untimed warm-up call after its first (compile / JIT) call, in
    the quick run too: one-time costs in the timed calls made the quick plot's ratios
    suggestive (a tiny bf16 eager row at 363 ms vs 54 ms patched on a CPU)."""
    E = _module()
    for mode in ("quick", "default", "full"):
        r = E._reps(mode)
        assert r["warmup"] >= 1 and r["min_reps"] >= 2, (mode, r)


def test_default_run_keeps_the_model_sizes_and_fewer_blocks():
    E = _module()
    (dm, dd, dp), (fm, fd, fp) = E.select("default"), E.select("full")
    assert dm == fm and dp == fp == E.PROVIDER_NAMES
    assert dd == [(2, 4), (4,)] and fd == [(19, 38), (40,)]
    flux, wan = E.specs_for("default")
    assert flux.latent == (64, 64) and flux.text == 512  # 4096 image + 512 text tokens
    cfg = dict(flux.config)
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["joint_attention_dim"],
            cfg["pooled_projection_dim"], cfg["in_channels"], cfg["guidance_embeds"]) == \
        (24, 128, 4096, 768, 64, True)
    B, C, F, H, W = wan.latent
    pt, ph, pw = dict(wan.config)["patch_size"]
    assert (B, C, F, H, W) == (1, 16, 21, 60, 104) and F // pt * (H // ph) * (W // pw) == 32760
    cfg = dict(wan.config)
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["ffn_dim"],
            cfg["text_dim"], wan.text) == (40, 128, 13824, 4096, 512)
    names = E.PROVIDER_NAMES
    assert names[0] == "bf16 eager" and names[-1].startswith("torchao")  # torchao last


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    E = _module()
    with pytest.raises(SystemExit, match="no such file or folder"):
        E.main(["--model", str(tmp_path / "nope"), "--device", "cpu", "--out", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        E.main(["--model", str(tmp_path / "empty"), "--device", "cpu", "--out", str(tmp_path)])
    assert not (tmp_path / "e2e.md").exists()  # refused before anything ran


def test_local_checkpoint_is_loaded_and_cut_to_its_first_blocks(tmp_path):
    """--model PATH: the transformer/ subfolder of a pipeline folder, the class from its
    config.json, the default run keeping its first blocks, --full all of them."""
    from diffusers import FluxTransformer2DModel
    E = _module()
    spec = E.tiny_specs()[0]
    torch.manual_seed(0)
    m = FluxTransformer2DModel(**dict(spec.config), num_layers=3, num_single_layers=5)
    m.save_pretrained(tmp_path / "transformer")
    s = E.spec_from_checkpoint(str(tmp_path), "default")
    assert s.kind == "flux" and s.depth == (2, 4) and s.full_depth == (3, 5)
    assert E.spec_from_checkpoint(str(tmp_path), "full").depth == (3, 5)
    loaded = E.build_model(s, torch.device("cpu"), torch.float32)
    assert len(loaded.transformer_blocks) == 2 and len(loaded.single_transformer_blocks) == 4
    torch.testing.assert_close(loaded.transformer_blocks[1].ff.net[2].weight,
                               m.transformer_blocks[1].ff.net[2].weight, rtol=0, atol=0)
    inp = E.make_inputs(s, loaded, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        assert loaded(**inp, return_dict=False)[0].shape == inp["hidden_states"].shape
    from diffusers import WanTransformer3DModel
    wan = E.tiny_specs()[1]
    WanTransformer3DModel(**dict(wan.config), num_layers=6).save_pretrained(tmp_path / "wan")
    if not _has("accelerate"):  # diffusers loads Wan (fp32-kept modules) only through it
        with pytest.raises(SystemExit, match="needs the package 'accelerate'"):
            E.spec_from_checkpoint(str(tmp_path / "wan"), "default")
    else:
        w = E.spec_from_checkpoint(str(tmp_path / "wan"), "default")  # no transformer/ folder
        assert w.kind == "wan" and w.depth == (4,) and w.full_depth == (6,)
        assert w.latent == (1, 16, 21, 60, 104)  # the 480p 81-frame latent
        assert len(E.build_model(w, torch.device("cpu"), torch.float32).blocks) == 4
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(SystemExit, match="supported: FluxTransformer2DModel"):
        E.spec_from_checkpoint(str(tmp_path), "default")


def test_bench_extra_installs_what_bench_e2e_imports():
    """setup.py's 'bench' extra (what bench/run.sh installs) holds every package bench_e2e needs
    beyond torch: diffusers (the models), accelerate (diffusers loads a Wan checkpoint only
    through it: --model), matplotlib (the PNG), tqdm (the progress bar)."""
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                  for kw in node.keywords if kw.arg == "extras_require")
    extras = ast.literal_eval(extras)
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()
             for r in extras["bench"]}
    assert {"diffusers", "accelerate", "matplotlib", "tqdm"} <= names, names


def test_without_pyops_patch_the_pyops_rows_say_so(monkeypatch):
    """A pyops without pyops.patch: the pyops rows stay blank with the reason, never a
    stand-in; the other rows still run."""
    import argparse

    import pyops
    E = _module()
    U = sys.modules["utils"]
    monkeypatch.delattr(pyops, "patch", raising=False)
    st = E.State(E.tiny_specs()[0], torch.device("cpu"), torch.float32)
    args = argparse.Namespace(quick=True, mode="quick", compile_scope="regional")
    prog = E.Progress(2, enabled=False)
    by_name = {p.name: p for p in E.PROVIDERS}
    row = E.run_provider(st, by_name["pyops all"], args, U.Budget(None), False, prog)
    assert row["note"] == E.NEEDS_PATCH and row.get("ms") is None
    row = E.run_provider(st, by_name["bf16 eager"], args, U.Budget(None), False, prog)
    assert row["ms"] > 0 and row["cos"] == pytest.approx(1.0)
    with pytest.raises(E._Skip, match="needs pyops.patch"):
        E.patch_config(by_name["pyops linear fp8"], quick=True)


# ---- bench/run.sh, the README's main job ----------------------------------------------------------
_FAKE_PY = r"""#!/usr/bin/env bash
# A stand-in for python3 in bench/run.sh: logs every call; torch importable, CUDA as FAKE_CUDA
# says; pip and `-m pyops` succeed without doing anything; a bench script only writes the files
# bench_e2e.py would (into its --out folder, the PNG unless FAKE_NO_PNG is set).
echo "$*" >>"$FAKE_LOG"
if [ "$1" = "-c" ]; then
    case "$2" in
        "import torch") exit 0 ;;
        *torch.cuda.is_available*) [ "$FAKE_CUDA" = 1 ]; exit ;;
    esac
    exit 1
fi
case "$1 $2" in
    "-m pip"|"-m pyops") exit 0 ;;
esac
case "$1" in
    bench/bench_e2e.py)
        out=bench/out
        prev=""
        for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
        mkdir -p "$out" && touch "$out/e2e.md" "$out/e2e.json"
        [ -n "${FAKE_NO_PNG:-}" ] || touch "$out/e2e.png"
        exit 0 ;;
    bench/*.py) exit 0 ;;
esac
exit 3
"""


def _run_sh(tmp_path, cuda: bool, **env_extra):
    fake = tmp_path / "python3"
    fake.write_text(_FAKE_PY)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(log), FAKE_CUDA="1" if cuda else "0",
               BENCH_ARGS=f"--out {out}", **env_extra)
    r = subprocess.run(["bash", str(BENCH / "run.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, log.read_text().splitlines(), out


@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_run_sh_on_a_gpu_runs_bench_e2e_first_and_says_where_its_results_are(tmp_path):
    stdout, calls, out = _run_sh(tmp_path, cuda=True)
    pip = [c for c in calls if c.startswith("-m pip ")]
    assert pip == ["-m pip install --disable-pip-version-check -q --no-build-isolation -e "
                   ".[bench]"], pip
    benches = [c.split()[0] for c in calls if c.startswith("bench/")]
    scripts = sorted(p.name for p in BENCH.glob("bench_*.py"))
    covered = {"bench_quantize_fp8.py", "bench_quantize_nvfp4.py"}  # run by bench_quantize.py
    assert benches[0] == "bench/bench_e2e.py"
    assert sorted(benches) == [f"bench/{s}" for s in scripts if s not in covered]
    assert all(c.endswith(f"--out {out}") for c in calls if c.startswith("bench/"))
    assert f"table: {out}/e2e.md" in stdout and f"plot:  {out}/e2e.png" in stdout
    (tmp_path / "again").mkdir()
    stdout, _, out = _run_sh(tmp_path / "again", cuda=True, FAKE_NO_PNG="1")
    # no PNG: bench_e2e says why (matplotlib missing, a plotting error) in its table notes
    assert f"plot:  none (see the notes in {out}/e2e.md)" in stdout


@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_run_sh_on_a_cpu_runs_the_demo_then_the_quick_pipeline(tmp_path):
    stdout, calls, out = _run_sh(tmp_path, cuda=False)
    assert any(c.startswith("-m pip install") and c.endswith("-e .[bench]") for c in calls)
    demo = calls.index(f"-m pyops demo --out {out}")  # BENCH_ARGS' --out: demo.png there too
    e2e = calls.index(f"bench/bench_e2e.py --quick --out {out}")
    assert demo < e2e
    assert f"{out}/demo.png" in stdout
    assert not [c for c in calls if c.startswith("bench/") and "bench_e2e" not in c]
    assert "The speed numbers need a CUDA GPU" in stdout
    assert f"table: {out}/e2e.md" in stdout and f"plot:  {out}/e2e.png" in stdout
