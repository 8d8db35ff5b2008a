"""Benchmark harness shared by every ``bench/bench_*.py``.

* ``time_ms(fn)``: median milliseconds. On CUDA through ``triton.testing.do_bench``
  (``return_mode="median"``; it zeroes a 256 MB buffer before every call, so the L2 cache starts
  cold), or CUDA events with the same flush when Triton is missing; on CPU a ``perf_counter``
  median, only so that the scripts can be smoke-tested without a GPU.
* ``time_ms_graph(fn, inputs)``: median per call of CUDA-graph replays that cycle through several
  input sets whose bytes together exceed twice the L2 cache, for kernels so small that launch
  gaps would dominate. Returns None off CUDA or when the capture fails. ``rotating_inputs``
  builds those sets for calls that move less than twice the L2 (``graph_max_bytes``).
* ``bench_providers``: one row per provider with ``ms`` (do_bench), ``ms graph`` (when measured),
  ``µs`` per call (the graph replay when measured, else the do_bench median; ``µs from`` in the
  JSON says which), ``GB/s`` and ``% copy`` (from ``ms``) and ``x ideal`` (``µs`` over the ideal
  time: bytes moved / the copy bandwidth measured in the same run).
* ``copy_bandwidth_gbps(device)``: the ceiling, measured in the same run: a device-to-device copy
  of ``nbytes`` (>= 256 MB on a GPU), counting bytes read + bytes written.
* ``env_record()``: GPU, capability, SM count, L2, driver, torch/CUDA/Triton/pyops versions,
  date, host, command line.
* ``Table``: rows of results; ``write_results`` writes ``<name>.json`` (records + env) and
  ``<name>.md`` (env header + markdown tables) under ``--out``.

CLI conventions for every bench script (``add_common_args`` + ``resolve_run``): ``--out DIR``
(default bench/out), ``--device``, ``--budget-s`` and the run size:

* default: the headline shapes and the key providers, about a minute or less on an H100/H200
  (each script's first comment gives its estimate);
* ``--full``: every shape and provider;
* ``--quick``: tiny shapes, every provider: a smoke test of the harness. On a CPU this is the
  default, with a one-line notice that CPU times are not performance numbers (``--full`` on a
  CPU gets a notice naming ``--full`` instead, and a warning that it is slow).

Each script rewrites its files after every row (``Table.on_add`` + ``autosave``), so a run cut
short keeps every row it finished. Never write a number that was not measured: a value that could
not be measured is None in JSON and blank in markdown.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without an install
    sys.path.insert(0, str(ROOT))

MB = 1e6
GB = 1e9


# ---- timing ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_time_ms(fn: Callable[[], Any], warmup_ms: float, rep_ms: float,
                 max_iters: int = 1000) -> float:
    fn()
    t0 = time.perf_counter()
    n = 0
    while (time.perf_counter() - t0) * 1e3 < warmup_ms and n < max_iters:
        fn()
        n += 1
    times = []
    t_end = time.perf_counter() + rep_ms * 1e-3
    while (len(times) < 5 or time.perf_counter() < t_end) and len(times) < max_iters:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


_FLUSH: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    return _FLUSH[key]


def _cuda_events_time_ms(fn: Callable[[], Any], warmup_ms: float, rep_ms: float,
                         device: torch.device) -> float:
    """do_bench's method without Triton: flush L2, time each call with events, take the median."""
    cache = _l2_flush_buffer(device)
    fn()
    torch.cuda.synchronize(device)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        cache.zero_()
        fn()
    e.record()
    torch.cuda.synchronize(device)
    est = max(s.elapsed_time(e) / 5, 1e-3)
    n_warm = max(1, int(warmup_ms / est))
    n_rep = max(5, min(int(rep_ms / est), 10000))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))


def time_ms(fn: Callable[[], Any], *, device: Optional[torch.device] = None,
            warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn()`` (which must have been called once already if it compiles)."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda":
        return _cpu_time_ms(fn, warmup_ms, rep_ms)
    try:
        import triton.testing
    except Exception:
        return _cuda_events_time_ms(fn, warmup_ms, rep_ms, device)
    with torch.cuda.device(device):
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                             return_mode="median"))


def rotation_count(bytes_per_call: int, device: torch.device, cap: int = 64) -> int:
    """How many input sets make one pass through them at least twice the L2 cache."""
    if device.type != "cuda":
        return 1
    l2 = l2_bytes(device) or 64 * 1024 * 1024
    return max(2, min(cap, math.ceil(2 * l2 / max(bytes_per_call, 1)) + 1))


def time_ms_graph(fn: Callable[..., Any], inputs: Sequence[tuple], *,
                  device: Optional[torch.device] = None, replays: int = 20,
                  calls_per_graph: Optional[int] = None) -> Optional[float]:
    """Median ms per call of CUDA-graph replays of ``fn(*inputs[i % len(inputs)])``.

    One graph holds ``calls_per_graph`` calls (default: enough to visit every input set at
    least twice, >= 8), so each replay's launch cost is shared and consecutive calls never
    touch the same input. Returns None off CUDA or when capture fails (e.g. a host sync).
    """
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if device.type != "cuda" or not inputs:
        return None
    n = calls_per_graph or max(8, 2 * len(inputs))
    try:
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm up off the capture (handles, autotuning)
                for i in range(min(n, 3)):
                    fn(*inputs[i % len(inputs)])
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(n):
                    fn(*inputs[i % len(inputs)])
            g.replay()
            torch.cuda.synchronize(device)
            times = []
            for _ in range(replays):
                s = torch.cuda.Event(enable_timing=True)
                e = torch.cuda.Event(enable_timing=True)
                s.record()
                g.replay()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / n)
            del g
            return statistics.median(times)
    except Exception as e:  # capture is best-effort: report, do not fail the benchmark
        print(f"[bench] CUDA-graph timing failed: {type(e).__name__}: {e}", file=sys.stderr)
        try:
            torch.cuda.synchronize(device)
        except Exception:
            pass
        return None


# ---- ceilings and units ---------------------------------------------------------------------------
def copy_bandwidth_gbps(device, nbytes: int = 512 * 1024 * 1024) -> dict:
    """Median GB/s (bytes read + bytes written) of ``dst.copy_(src)`` of ``nbytes`` bytes."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn()
    _sync(device)
    ms = time_ms(fn, device=device)
    moved = 2 * n * 4
    del src, dst
    return {"gbps": moved / (ms * 1e-3) / GB, "ms": ms, "bytes_copied": n * 4,
            "bytes_moved": moved, "device": str(device)}


def gbps(nbytes: float, ms: Optional[float]) -> Optional[float]:
    if ms is None or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / GB


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def pct(value: Optional[float], ceiling: Optional[float]) -> Optional[float]:
    if value is None or not ceiling:
        return None
    return 100.0 * value / ceiling


def ideal_ms(nbytes: float, ceiling_gbps: Optional[float]) -> Optional[float]:
    """The time ``nbytes`` (read + written) take at the copy bandwidth ``ceiling_gbps``."""
    if not ceiling_gbps or ceiling_gbps <= 0:
        return None
    return nbytes / (ceiling_gbps * GB) * 1e3


def per_call_timing(row: dict, nbytes: float, ceiling_gbps: Optional[float]) -> dict:
    """Fill ``µs`` (per call: ``ms graph`` when measured, else ``ms``), ``µs from`` ("graph" or
    "do_bench"), ``ideal µs`` (``nbytes`` at the copy bandwidth) and ``x ideal`` (``µs`` /
    ``ideal µs``) of a row from its measured ``ms`` / ``ms graph``; nothing when neither was
    measured (no number is made up)."""
    g, m = row.get("ms graph"), row.get("ms")
    t = g if g is not None else m
    for k in ("µs", "µs from", "ideal µs", "x ideal"):
        row.pop(k, None)
    if t is None:
        return row
    row["µs"] = 1000.0 * t
    row["µs from"] = "graph" if g is not None else "do_bench"
    ideal = ideal_ms(nbytes, ceiling_gbps)
    if ideal:
        row["ideal µs"] = 1000.0 * ideal
        row["x ideal"] = t / ideal
    return row


PER_CALL_NOTE = ("µs: per call, the CUDA-graph replay time (ms graph) where it was measured, else "
                 "the do_bench median (ms); x ideal = µs / (bytes moved / the copy bandwidth "
                 "measured in the same run), 1.0 = copy speed.")


# ---- environment ----------------------------------------------------------------------------------
def l2_bytes(device: torch.device) -> Optional[int]:
    try:
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    except Exception:
        return None


def _run(cmd: list[str]) -> Optional[str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:
        return None


def _driver_version() -> Optional[str]:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        import pynvml
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return None


def env_record(device=None) -> dict:
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    d: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "device": str(device),
    }
    try:
        import triton
        d["triton"] = triton.__version__
    except Exception:
        d["triton"] = None
    try:
        import pyops
        from pyops import _backend
        d["pyops"] = pyops.__version__
        d["pyops_cuda_extension"] = _backend.extension_status()[1]
        d["pyops_extension_archs"] = _backend.extension_archs()
    except Exception as e:
        d["pyops"] = f"import failed: {type(e).__name__}: {e}"
    d["git_commit"] = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        d.update({
            "gpu": p.name,
            "capability": f"sm_{p.major}{p.minor}",
            "sm_count": p.multi_processor_count,
            "l2_mb": round(l2_bytes(device) / 2**20, 1) if l2_bytes(device) else None,
            "gpu_mem_gib": round(p.total_memory / 2**30, 1),
            "driver": _driver_version(),
        })
    else:
        d.update({"gpu": None, "cpu": platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count()})
    return d


def env_markdown(env: dict) -> str:
    card = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_count')} cores) - smoke " \
                             f"test only, not a performance number"
    lines = [f"- card: {card}" + (f" ({env['capability']}, {env['sm_count']} SMs, "
                                  f"{env['l2_mb']} MB L2, driver {env['driver']})"
                                  if env.get("gpu") else ""),
             f"- date: {env['date']}  host: {env['host']}",
             f"- versions: torch {env['torch']} (CUDA {env['cuda_runtime']}), triton "
             f"{env['triton']}, pyops {env.get('pyops')} ({env.get('pyops_cuda_extension')}), "
             f"python {env['python']}, commit {env.get('git_commit')}",
             f"- command: `{env['command']}`"]
    if env.get("run"):
        lines.append(f"- run: {RUN_TEXT.get(env['run'], env['run'])}")
    if env.get("copy_gbps") is not None:
        lines.append(f"- measured copy bandwidth (read + write, {env['copy_bytes'] / 2**20:.0f} "
                     f"MiB copied, median): {env['copy_gbps']:.0f} GB/s")
    return "\n".join(lines)


# ---- tables and files -----------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        a = abs(v)
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.1:
            return f"{v:.3f}"
        return f"{v:.4f}"
    return str(v)


class Table:
    """Rows of one benchmark: ``add(**row)``; ``markdown()``; ``records()`` for JSON."""

    def __init__(self, title: str, columns: Sequence[str], notes: Iterable[str] = ()):
        self.title = title
        self.columns = list(columns)
        self.rows: list[dict] = []
        self.notes = list(notes)
        self.on_add: Optional[Callable[["Table"], Any]] = None  # called after every row

    def add(self, **row) -> dict:
        self.rows.append(row)
        if self.on_add is not None:
            self.on_add(self)
        return row

    def extend(self, other: "Table") -> None:
        self.rows.extend(other.rows)
        for n in other.notes:
            if n not in self.notes:
                self.notes.append(n)

    def markdown(self) -> str:
        out = [f"### {self.title}", "",
               "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" for _ in self.columns) + "|"]
        for r in self.rows:
            out.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "/") for c in self.columns)
                       + " |")
        if self.notes:
            out.append("")
            out.extend(f"- {n}" for n in self.notes)
        return "\n".join(out)

    def as_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows,
                "notes": self.notes}


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, torch.Size):
        return list(o)
    return repr(o)


def write_results(out_dir, name: str, tables: Sequence[Table], env: dict,
                  quiet: bool = False) -> tuple[Path, Path]:
    """Write ``<out>/<name>.json`` ({env, tables, records}) and ``<out>/<name>.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [{"bench": name, "table": t.title, **r} for t in tables for r in t.rows]
    jp = out / f"{name}.json"
    _write_atomic(jp, json.dumps({"env": env, "tables": [t.as_dict() for t in tables],
                                  "records": records}, indent=1, default=_json_default))
    md = f"## {name}\n\n{env_markdown(env)}\n\n" + "\n\n".join(t.markdown() for t in tables) + "\n"
    mp = out / f"{name}.md"
    _write_atomic(mp, md)
    return jp, mp


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a run killed mid-write leaves the previous,
    complete file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def autosave(tables: Sequence[Table], out_dir, name: str, env: dict) -> Callable[..., Any]:
    """Rewrite ``<out>/<name>.json`` and ``.md`` after every row added to any of ``tables``
    (so a run cut short keeps every finished row); returns the save function."""
    def save(_table: Optional[Table] = None) -> None:
        write_results(out_dir, name, tables, env)
    for t in tables:
        t.on_add = save
    return save


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default=str(ROOT / "bench" / "out"),
                   help="folder for <name>.json and <name>.md (default bench/out)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="tiny shapes, every provider: a smoke test of the harness (the "
                           "default on a CPU)")
    size.add_argument("--full", action="store_true",
                      help="every shape and provider (minutes on a GPU); without it: the "
                           "headline shapes and key providers, about a minute or less on an "
                           "H100/H200")
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget in seconds: once spent, slow optional providers "
                        "(compiles, eager references) are skipped and marked so (default run: "
                        "the script's own budget; --full and --quick: none)")
    p.add_argument("--warmup-ms", type=float, default=20, help="do_bench warmup (ms)")
    p.add_argument("--rep-ms", type=float, default=60, help="do_bench repetition time (ms)")
    return p


def pick_device(arg: Optional[str]) -> torch.device:
    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


RUN_TEXT = {
    "quick": "--quick (tiny shapes, every provider: a smoke test of the harness; the times mean "
             "nothing)",
    "default": "default (the headline shapes and the key providers; --full runs every shape and "
               "provider)",
    "full": "--full (every shape and provider)",
}
CPU_NOTICE = ("NOTE: CPU run: these times are NOT performance numbers, only a smoke test of the "
              "benchmark harness (tiny --quick shapes); run on a CUDA GPU for real numbers.")
CPU_FULL_NOTICE = ("NOTE: CPU run: these times are NOT performance numbers, only a smoke test of "
                   "the benchmark harness (--full: every shape and provider, at GPU size); run "
                   "on a CUDA GPU for real numbers.")
CPU_FULL_WARNING = ("WARNING: --full on a CPU runs the GPU-size shapes through the PyTorch "
                    "reference and the Triton interpreter: it can take hours, and the times "
                    "still mean nothing.")


def cpu_notice(mode: str) -> str:
    """The first line a run off CUDA prints for run size ``mode`` (``"quick"`` or ``"full"``)."""
    return CPU_FULL_NOTICE if mode == "full" else CPU_NOTICE


def resolve_run(args, default_budget_s: Optional[float] = None) -> torch.device:
    """Pick the device and the run size for a bench script (once, right after parsing).

    Sets ``args.mode`` to ``"quick"``, ``"default"`` or ``"full"`` (and ``args.quick`` /
    ``args.full`` to match) and returns the device. On a device other than CUDA the run is
    ``--quick`` unless ``--full`` was given, and a one-line notice (``cpu_notice(mode)``:
    ``CPU_NOTICE`` for the quick run, ``CPU_FULL_NOTICE`` for ``--full``) says the times are no
    performance numbers; ``--full`` there runs, and also prints ``CPU_FULL_WARNING``.
    In the default run on CUDA, ``default_budget_s`` becomes ``--budget-s`` when none was
    given (slow optional providers are then skipped and marked once it is spent).
    """
    device = pick_device(getattr(args, "device", None))
    quick, full = bool(getattr(args, "quick", False)), bool(getattr(args, "full", False))
    if quick and full:
        raise SystemExit("--quick and --full exclude each other")
    if device.type != "cuda":
        if not full:
            quick = True
        print(cpu_notice("full" if full else "quick"), flush=True)
        if full:
            print(CPU_FULL_WARNING, flush=True)
    args.quick, args.full = quick, full
    args.mode = "quick" if quick else "full" if full else "default"
    if args.mode == "default" and getattr(args, "budget_s", None) is None:
        args.budget_s = default_budget_s
    return device


def pick(mode: str, default, full, quick):
    """``quick`` / ``default`` / ``full`` by the run size ``mode`` (see ``resolve_run``)."""
    return {"quick": quick, "default": default, "full": full}[mode]


def measure_ceiling(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth for the env record: >= 256 MB copied on a GPU; a small copy on CPU."""
    nbytes = 512 * 2**20 if device.type == "cuda" else (16 * 2**20 if quick else 256 * 2**20)
    r = copy_bandwidth_gbps(device, nbytes)
    return {"copy_gbps": r["gbps"], "copy_bytes": r["bytes_copied"], "copy_ms": r["ms"]}


class Budget:
    """A soft deadline: ``spent()`` is True once ``seconds`` have passed (never, when None)."""

    def __init__(self, seconds: Optional[float]):
        self.t0 = time.monotonic()
        self.seconds = seconds

    def spent(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.t0 > self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


# ---- providers side by side -----------------------------------------------------------------------
class Provider:
    """One implementation to time: ``fn(*args)``.

    ``slow``: optional and slow (a compile, an eager multi-kernel reference): skipped once the
    budget is spent. ``graph``: also time CUDA-graph replays when the caller asks for them.
    ``check``: ``check(fn) -> bool`` bit-exactness against the reference (None: not checked).
    ``nbytes``: the bytes this provider moves when they differ from the op's (None: the op's).
    """

    def __init__(self, name: str, fn: Callable, *, slow: bool = False, graph: bool = True,
                 check: Optional[Callable[[Callable], bool]] = None, compiles: bool = False,
                 nbytes: Optional[int] = None):
        self.name, self.fn, self.slow, self.graph = name, fn, slow, graph
        self.check, self.compiles, self.nbytes = check, compiles, nbytes


def bench_providers(table: Table, base: dict, providers: Sequence[Provider], args: tuple,
                    nbytes: int, ceiling_gbps: Optional[float], device: torch.device,
                    budget: Optional[Budget] = None,
                    graph_inputs: Optional[Sequence[tuple]] = None,
                    warmup_ms: float = 25, rep_ms: float = 100,
                    finish_row: Optional[Callable[[dict], Any]] = None) -> None:
    """Add one row per provider to ``table``: ms, ms graph, µs, GB/s, % copy, x ideal, exact,
    note (``per_call_timing`` says how µs and x ideal are formed).

    A provider that raises gets a row with its error in ``note`` and no numbers.
    ``finish_row(row)``, when given, completes a row (derived columns) before it is added.
    """
    op_nbytes = nbytes
    for p in providers:
        nbytes = p.nbytes if p.nbytes is not None else op_nbytes
        row = dict(base, provider=p.name, bytes=int(nbytes))
        if p.slow and budget is not None and budget.spent():
            row["note"] = "skipped: time budget spent"
            if finish_row is not None:
                finish_row(row)
            table.add(**row)
            continue
        try:
            t0 = time.perf_counter()
            p.fn(*args)  # first call: compiles / autotunes / loads
            _sync(device)
            first_s = time.perf_counter() - t0
            if p.compiles:
                row["compile_s"] = round(first_s, 2)
            if p.check is not None:
                row["exact"] = bool(p.check(p.fn))
            ms = time_ms(lambda: p.fn(*args), device=device, warmup_ms=warmup_ms,
                         rep_ms=rep_ms)
            row["ms"] = ms
            row["GB/s"] = gbps(nbytes, ms)
            row["% copy"] = pct(row["GB/s"], ceiling_gbps)
            if graph_inputs and p.graph and device.type == "cuda":
                gms = time_ms_graph(p.fn, graph_inputs, device=device)
                row["ms graph"] = gms
                row["GB/s graph"] = gbps(nbytes, gms)
            per_call_timing(row, nbytes, ceiling_gbps)
            notes = []
            if p.compiles:
                notes.append(f"first call (compile) {first_s:.1f} s")
            if row.get("exact") is False:
                notes.append("NOT bit-exact vs reference")
            if notes:
                row["note"] = "; ".join(notes)
        except Exception as e:  # one broken provider must not lose the others' numbers
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
            row["note"] = f"error: {msg}"
            print(f"[bench] {base} {p.name}: {msg}", file=sys.stderr)
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize(device)
                except Exception:
                    pass
        if finish_row is not None:
            finish_row(row)
        table.add(**row)
        print("  " + "  ".join(f"{k}={_fmt(row[k])}" for k in table.columns
                               if row.get(k) is not None), flush=True)


def fp8_row_self_consistent(fp8, y: torch.Tensor) -> bool:
    """The check of the fused producers (norm_modulate_quant, gelu_quant): the FP8Tensor's
    codes and per-token scales equal ``quantize_fp8(y, "row")`` (reference) of the fp32 y the
    same call returned, bit for bit."""
    import pyops
    want = pyops.quantize_fp8(y, "row", backend="reference")
    return (torch.equal(fp8.data.view(torch.uint8), want.data.view(torch.uint8))
            and torch.equal(fp8.scale.view(torch.int32), want.scale.view(torch.int32)))


def ok_column(row: dict) -> None:
    """A ``finish_row`` for self-consistency checks: the harness's check column "exact" is
    reported as "ok" (q/scale equal quantize_fp8 of the provider's own y, not the reference's)."""
    if "exact" in row:
        row["ok"] = row.pop("exact")
        if row.get("note") == "NOT bit-exact vs reference":
            row["note"] = "q/scale NOT quantize_fp8 of its own y"


def raise_compile_limits() -> None:
    """One compiled function is re-specialized per shape: allow that without falling back."""
    try:
        import torch._dynamo.config as dc
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dc, name):
                setattr(dc, name, max(getattr(dc, name), 256))
        if hasattr(dc, "accumulated_recompile_limit"):
            dc.accumulated_recompile_limit = max(dc.accumulated_recompile_limit, 4096)
        if hasattr(dc, "accumulated_cache_size_limit"):
            dc.accumulated_cache_size_limit = max(dc.accumulated_cache_size_limit, 4096)
    except Exception:
        pass


def bandwidth_main(name: str, parser: argparse.ArgumentParser, run: Callable, argv=None,
                   default_budget_s: Optional[float] = None) -> int:
    """The ``main`` of a one-table, memory-bound benchmark: parse args, pick the run size
    (``resolve_run``), record the environment, measure the copy ceiling in the same run, call
    ``run(args, device, ceiling_gbps, budget, progress=...)`` (``progress(table)`` rewrites the
    files; ``run`` calls it after every row), write and print the table."""
    args = parser.parse_args(argv)
    device = resolve_run(args, default_budget_s)
    env = env_record(device)
    env["run"] = args.mode
    env.update(measure_ceiling(device, args.quick))
    budget = Budget(args.budget_s)
    t = run(args, device, env["copy_gbps"], budget,
            progress=lambda tb: write_results(args.out, name, [tb], env))
    write_results(args.out, name, [t], env)
    print(env_markdown(env) + "\n\n" + t.markdown())
    return 0


GRAPH_MAX_BYTES = 64 * 2**20  # the graph-timing limit where the L2 size is unknown


def graph_max_bytes(device: torch.device) -> int:
    """CUDA-graph replay timing applies to calls that move less than this: twice the L2 cache
    (a larger call cannot be flattered by the L2, and do_bench's launch overhead is small next to
    it); ``GRAPH_MAX_BYTES`` where the L2 size cannot be read."""
    l2 = l2_bytes(device) if device.type == "cuda" else None
    return 2 * l2 if l2 else GRAPH_MAX_BYTES


def rotating_inputs(nbytes: int, device: torch.device, make: Callable[[], tuple]
                    ) -> Optional[list]:
    """Input sets for ``time_ms_graph`` (enough to exceed twice the L2), or None when graph
    timing does not apply (CPU, or ``nbytes`` -- the bytes one call moves -- of twice the L2 or
    more, ``graph_max_bytes``)."""
    if device.type != "cuda" or nbytes >= graph_max_bytes(device):
        return None
    return [make() for _ in range(rotation_count(nbytes, device))]


def compile_allowed(args, device: torch.device, table: "Table") -> bool:
    """torch.compile providers run on CUDA, and on CPU only with ``--compile`` (noted)."""
    ok = device.type == "cuda" or bool(getattr(args, "compile", False))
    if not ok:
        table.notes.append("torch.compile providers not run on CPU (pass --compile to force).")
    return ok
