"""Context parallelism: a diffusers transformer forward on 1 GPU and split over N GPUs (Ulysses,
ring), diffusers' bf16 attention against pyops attention as the context-parallel backend.

    python bench/bench_cp.py [--out bench/out] [--full | --quick] [--device cuda] [--nproc N]
    torchrun --nproc-per-node N bench/bench_cp.py [...]     # the same, launched by torchrun

Launch: under torchrun (RANK / WORLD_SIZE set) the given world runs. Otherwise the script starts
one process per GPU itself (torch.multiprocessing, spawn; NCCL, a free local port), or ``--nproc``
processes; with one GPU it measures the 1-GPU rows only and says that the context-parallel rows
need N >= 2 GPUs. On a CPU it starts 2 gloo processes (the quick smoke test; diffusers 0.42.1
picks a rank's device as rank % torch.accelerator.device_count(), 0 without an accelerator, so
that count is reported as 1 around ``enable_parallelism``, as tests/test_context_parallel.py
does). Only rank 0 writes files and prints.

Models (random bf16 weights, seed 0, broadcast from rank 0; the same full inputs on every rank,
diffusers' ``cp_plan`` hooks shard them and gather the output): ``FluxTransformer2DModel`` at
Flux-dev width (24 heads x 128, joint 4096, pooled 768, guidance embedding), 2 double + 4 single
blocks, at 4096 and 16384 image tokens (1024² and 2048²) + 512 text tokens; in ``--full`` also
``WanTransformer3DModel`` at Wan 2.1 14B width (40 heads x 128, ffn 13824), 4 blocks, 480p 81
frames (32760 tokens) + 512 text tokens. ``--quick`` (the default on a CPU): a tiny Flux (4 heads
x 16, 16 image + 8 text tokens).

Providers (diffusers attention backends, ``transformer.set_attention_backend``): ``_native_cudnn``
(torch's cuDNN SDPA; context-parallel capable in diffusers) and ``pyops_int8``
(``pyops.register_diffusers_backends()``); ``--full`` adds ``native`` (torch SDPA) and
``pyops_fp8``. The quick run: ``native`` and ``pyops_int8_reference`` (the reference op backend).
Per world size N in {1, the world} and mode {ulysses (``ulysses_degree=N``), ring
(``ring_degree=N``)}: ``enable_parallelism(config=ContextParallelConfig(...))`` on a copy of the
model, then every provider. diffusers' ``native`` backend cannot ring (it returns no lse): that
row is marked not measured.

Columns: ms per forward (median over calls; each call timed on the host from a barrier to the end
of the forward on the slowest rank), tokens/s, speed-up vs the same provider on 1 GPU, scaling
efficiency (speed-up / N), x bf16 (the first provider's ms at the same N and mode / this row's),
rel L2 of rank 0's output vs the 1-GPU output of the first (bf16) provider, in fp32. The 1-GPU
rows run on rank 0 alone, before the context-parallel rows, while the other ranks wait.
"""
# Run length on an H200, estimated (not measured: this script has not run on a GPU yet). Basis:
# the H200 measurement of 2026-11-30 (bench/RESULTS.md, section 1): a Flux-size block at 4608
# tokens ~3.1 ms in bf16 (174.6 ms / 57 blocks); at 16896 tokens ~4x the linear FLOPs and ~13x
# the attention FLOPs, assumed ~17 ms per block.
#   default on an 8-GPU H200 machine, ~50 s: spawning 8 processes that import torch, diffusers
#     and pyops ~15 s; NCCL start ~3 s; building the 2 + 4 block Flux (1.3 B parameters) on every
#     GPU and broadcasting it ~4 s; the 1-GPU rows on rank 0: the first pyops call (Triton JIT
#     when the CUDA extension does not serve it) assumed ~10 s, 2 providers x (~21 calls of
#     ~18 ms + ~8 of ~100 ms) ~3 s; per mode (2): copying the model, enable_parallelism (meshes,
#     NCCL communicators) ~2 s, 4 rows of <= 50 calls at ~1/N of the time plus communication
#     ~2 s: ~8 s; tear-down ~3 s. On a 1-GPU machine only the 1-GPU rows: ~30 s.
#   --full, ~2.5 min: adds 1 shape of Wan (4 blocks, 1.6 B parameters, ~300 ms per forward on 1
#     GPU) and 2 providers (~16 s of 1-GPU rows for Wan, ~8 s for Flux, each mode ~10 s more).
# estimate-h200-s: 50
# needs-gpus: 2
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from unittest import mock

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import utils as U  # noqa: E402

NAME = "cp"
DEFAULT_BUDGET_S = 55
COLUMNS = ["model", "shape", "tokens", "world size", "mode", "provider", "ms", "tokens/s",
           "speed-up vs 1 GPU", "scaling efficiency", "x bf16", "rel L2 vs 1-GPU bf16", "calls",
           "note"]
ONE_GPU_NOTE = "N >= 2 GPUs needed for the context-parallel rows: not measured here"

# Flux-dev and Wan 2.1 14B widths (the configs of bench_e2e.py: their config.json files)
FLUX = dict(in_channels=64, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56), num_layers=2, num_single_layers=4)
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
           out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, num_layers=4)
FLUX_TINY = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                 attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                 pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))


@dataclass(frozen=True)
class Shape:
    model: str     # "flux" | "wan" | "flux-tiny"
    label: str
    latent: tuple  # Flux: (h, w) of the packed token grid; Wan: (B, C, F, H, W)
    text: int      # text tokens

    @property
    def image_tokens(self) -> int:
        if self.model == "wan":
            _, _, f, h, w = self.latent
            return f * (h // 2) * (w // 2)
        return self.latent[0] * self.latent[1]

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text


FLUX_1K = Shape("flux", "Flux 1024² (4096 img + 512 txt tok)", (64, 64), 512)
FLUX_2K = Shape("flux", "Flux 2048² (16384 img + 512 txt tok)", (128, 128), 512)
WAN_480P = Shape("wan", "Wan 480p 81 frames (32760 + 512 txt tok)", (1, 16, 21, 60, 104), 512)
TINY = Shape("flux-tiny", "quick (16 img + 8 txt tok)", (4, 4), 8)


def select(mode: str):
    """(shapes, providers) of a run size: providers are diffusers backend names, the first one
    the bf16 reference."""
    return U.pick(mode, default=([FLUX_1K, FLUX_2K], ("_native_cudnn", "pyops_int8")),
                  full=([FLUX_1K, FLUX_2K, WAN_480P],
                        ("_native_cudnn", "native", "pyops_int8", "pyops_fp8")),
                  quick=([TINY], ("native", "pyops_int8_reference")))


# ---- processes ----------------------------------------------------------------------------------
class Group:
    """This rank in the process group (``active``: more than one rank, collectives run)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.active = world > 1

    def sync(self) -> None:
        """Wait for this device, then for every rank (a barrier)."""
        U._sync(self.device)
        if self.active:
            dist.all_reduce(torch.zeros(1, device=self.device))
            U._sync(self.device)

    def max(self, values: list) -> list:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def decide(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())


def time_forward(fn, g: Group, args) -> tuple:
    """(median ms per call, calls timed, output of the first call): the first call is untimed
    (JIT, autotuning); each timed call runs from a barrier to the end of the forward and counts
    as the slowest rank's time. The call counts come from the all-rank maximum of one timed call,
    so every rank makes the same calls (collectives must match)."""
    out = fn()
    g.sync()
    t0 = time.perf_counter()
    fn()
    U._sync(g.device)
    est = max(g.max([(time.perf_counter() - t0) * 1e3])[0], 1e-3)
    least = 5 if g.device.type == "cuda" else 3
    n = max(least, min(50, math.ceil(args.rep_ms / est)))
    for _ in range(min(10, math.ceil(args.warmup_ms / est))):
        fn()
    times = []
    for _ in range(n):
        g.sync()
        t0 = time.perf_counter()
        fn()
        U._sync(g.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(g.max(times)), n, out


# ---- models -------------------------------------------------------------------------------------
def build(kind: str, g: Group, dtype: torch.dtype):
    """The model on this rank's device: seed-0 random weights, then rank 0's broadcast."""
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel
    cls, cfg = {"flux": (FluxTransformer2DModel, FLUX), "wan": (WanTransformer3DModel, WAN),
                "flux-tiny": (FluxTransformer2DModel, FLUX_TINY)}[kind]
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(g.device):
            model = cls(**cfg).eval()
    finally:
        torch.set_default_dtype(old)
    if g.active:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, 0)
    return model


def make_inputs(shape: Shape, model, device: torch.device, dtype: torch.dtype) -> dict:
    """The forward's keyword arguments, the same on every rank (a seeded CPU generator)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(1)

    def rnd(*s):
        return torch.randn(*s, generator=gen).to(device, dtype)
    if shape.model == "wan":
        B, C, F, H, W = shape.latent
        return dict(hidden_states=rnd(B, C, F, H, W), encoder_hidden_states=rnd(B, shape.text,
                                                                                cfg.text_dim),
                    timestep=torch.full((B,), 500.0, device=device))
    h, w = shape.latent
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(h)),
                                     torch.arange(float(w)), indexing="ij"), -1)
    kw = dict(hidden_states=rnd(1, h * w, cfg.in_channels),
              encoder_hidden_states=rnd(1, shape.text, cfg.joint_attention_dim),
              pooled_projections=rnd(1, cfg.pooled_projection_dim),
              timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
              img_ids=ids.reshape(h * w, 3).to(device), txt_ids=torch.zeros(shape.text, 3,
                                                                             device=device))
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((1,), 3.5, device=device)
    return kw


def cp_plan(model) -> Optional[dict]:
    """Wan: its plan without the "" entry, which splits a per-token (B, tokens) timestep; a 1-D
    timestep (Wan 2.1) there makes diffusers 0.42.1 call logger.warning_once, which exists only
    once transformers is imported. Other models: their own plan (None)."""
    plan = getattr(model, "_cp_plan", None)
    if type(model).__name__ == "WanTransformer3DModel" and plan:
        return {k: v for k, v in plan.items() if k != ""}
    return None


def enable_cp(model, mode: str, n: int, device: torch.device) -> None:
    from diffusers import ContextParallelConfig
    cfg = ContextParallelConfig(**{f"{mode}_degree": n})
    # CPU: diffusers 0.42.1 picks its device as rank % torch.accelerator.device_count(), 0 on a
    # machine without an accelerator; reported as 1 there (as tests/test_context_parallel.py does)
    ctx = (mock.patch.object(torch.accelerator, "device_count", return_value=1)
           if device.type == "cpu" else contextlib.nullcontext())
    with ctx:
        model.enable_parallelism(config=cfg, cp_plan=cp_plan(model))


def why_not(shape: Shape, model, mode: str, n: int, provider: str) -> Optional[str]:
    """Why a context-parallel row cannot run (the same answer on every rank), or None."""
    from diffusers.models.attention_dispatch import AttentionBackendName as E
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry as R
    if provider not in E._value2member_map_ or not R._is_context_parallel_available(E(provider)):
        return f"not measured: {provider} is not context-parallel capable in this diffusers"
    if mode == "ring" and provider == "native":
        return "not measured: diffusers' native backend cannot ring (it returns no lse)"
    split = [shape.image_tokens] + ([shape.text] if shape.model != "wan" else [])
    if any(s % n for s in split):
        return f"not measured: {split} tokens do not split into {n} equal shards"
    if mode == "ulysses" and model.config.num_attention_heads % n:
        return f"not measured: {model.config.num_attention_heads} heads do not split over {n}"
    return None


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ---- the run ------------------------------------------------------------------------------------
def measure(model, kw, s, p, n, mode, g, args, ref, ms1, reason=None) -> dict:
    """One row: provider ``p`` on shape ``s`` with ``n`` ranks (``mode``), or ``reason`` why
    not. The 1-rank rows fill ``ms1`` and, for ``ref["provider"]`` (bf16), ``ref[s]``."""
    row = {"model": s.model, "shape": s.label, "tokens": s.tokens, "world size": n,
           "mode": mode, "provider": p}
    if reason is not None:
        row["note"] = reason
        return row
    try:
        model.set_attention_backend(p)
        with torch.inference_mode():
            ms, calls, out = time_forward(lambda: model(**kw, return_dict=False)[0], g, args)
        row.update(ms=ms, calls=calls)
        if n == 1:
            ms1[s, p] = ms
        if n == 1 and p == ref["provider"]:
            ref[s] = out.float()
            row["note"] = "the reference output"
        elif g.rank == 0 and s in ref:
            row["rel L2 vs 1-GPU bf16"] = rel_l2(out, ref[s])
    except Exception as e:  # report, never invent; same code and shapes: every rank raises
        row["note"] = f"error: {type(e).__name__}: {e}".splitlines()[0][:160]
        print(f"[bench_cp] rank {g.rank} {s.label} {mode} {p}: {row['note']}", file=sys.stderr)
    return row


def run_model(kind, shapes, providers, g, solo, args, emit, budget, dtype):
    model = build(kind, g, dtype)
    inputs = {s: make_inputs(s, model, g.device, dtype) for s in shapes}
    ref, ms1 = {"provider": providers[0]}, {}
    if g.rank == 0:  # the 1-GPU rows: rank 0 alone, the other ranks wait at the barrier below
        for s in shapes:
            for p in providers:
                emit(measure(model, inputs[s], s, p, 1, "single", solo, args, ref, ms1), ms1)
    g.sync()
    for mode in (("ulysses", "ring") if g.world > 1 else ()):
        cp_model = copy.deepcopy(model)
        first = next((p for p in providers if why_not(shapes[0], model, mode, g.world, p)
                      is None), providers[0])
        failed = None
        try:
            cp_model.set_attention_backend(first)  # enable_parallelism checks the current one
            enable_cp(cp_model, mode, g.world, g.device)
        except Exception as e:  # the same on every rank: each row of this mode says so
            failed = f"error: enable_parallelism: {type(e).__name__}: {e}".splitlines()[0][:160]
        for s in shapes:
            for p in providers:
                reason = failed or why_not(s, model, mode, g.world, p)
                if reason is None and g.decide(budget.spent()):
                    reason = "skipped: time budget spent"
                row = measure(cp_model, inputs[s], s, p, g.world, mode, g, args, ref, ms1,
                              reason)
                if g.rank == 0:
                    emit(row, ms1)
        del cp_model
    del model
    if g.device.type == "cuda":
        torch.cuda.empty_cache()


def finish(row: dict, ms1: dict, table: U.Table, shapes, providers) -> dict:
    """The derived columns of a row from measured times only."""
    ms = row.get("ms")
    if ms:
        s = next(x for x in shapes if x.label == row["shape"])
        row["tokens/s"] = s.tokens / (ms * 1e-3)
        n = row["world size"]
        base = ms1.get((s, row["provider"]))
        if n > 1 and base:
            row["speed-up vs 1 GPU"] = base / ms
            row["scaling efficiency"] = base / ms / n
        bf16 = next((r.get("ms") for r in table.rows if r["shape"] == row["shape"] and
                     r["world size"] == n and r["mode"] == row["mode"] and
                     r["provider"] == providers[0]), None)
        if bf16 and row["provider"] != providers[0]:
            row["x bf16"] = bf16 / ms
    return row


def worker(rank: int, world: int, args, init_method: Optional[str]) -> int:
    ndev = torch.cuda.device_count() if U.pick_device(args.device).type == "cuda" else 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % ndev) if ndev \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args.dist_timeout_s))
    with (contextlib.nullcontext() if rank == 0 else contextlib.redirect_stdout(io.StringIO())):
        U.resolve_run(args, DEFAULT_BUDGET_S)  # rank 0 prints the CPU notice
    import pyops
    pyops.register_diffusers_backends()
    pyops.register_diffusers_backends("reference")
    g, solo = Group(rank, world, device), Group(0, 1, device)
    shapes, providers = select(args.mode)
    table = U.Table(f"Context parallelism: {world} rank(s), diffusers backends", COLUMNS, notes=[
        "ms: median per forward, host-timed from a barrier to the end of the forward on the "
        "slowest rank; the 1-GPU rows (mode single) run on rank 0 alone before the others",
        f"rel L2: rank 0's output vs the 1-GPU output of {providers[0]}, fp32; x bf16: "
        f"{providers[0]}'s ms at the same N and mode / this row's",
        "Flux under Ulysses: diffusers splits text and image tokens separately, so the "
        "gathered key order differs from the single process (pyops' key-block P quantization "
        "then rounds differently); Wan (--full): its cp_plan without the per-token timestep entry "
        "(a 1-D timestep)"])
    if world == 1:
        table.notes.append(ONE_GPU_NOTE)
    if device.type == "cpu":
        table.notes.append("CPU: gloo; torch.accelerator.device_count reported as 1 around "
                           "enable_parallelism (diffusers divides the rank by it)")
    env = U.env_record(device) if rank == 0 else {}
    env.update(run=args.mode, world_size=world)
    if rank == 0:
        U.autosave([table], args.out, NAME, env)
        U.write_results(args.out, NAME, [table], env)

    def emit(row, ms1):
        table.add(**finish(row, ms1, table, shapes, providers))
        print("  " + "  ".join(f"{k}={U._fmt(row[k])}" for k in COLUMNS
                               if row.get(k) is not None), flush=True)
    budget = U.Budget(args.budget_s)
    dtype = torch.bfloat16
    try:
        for kind in dict.fromkeys(s.model for s in shapes):
            run_model(kind, [s for s in shapes if s.model == kind], providers, g, solo, args,
                      emit, budget, dtype)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        U.write_results(args.out, NAME, [table], env)
        print(U.env_markdown(env) + "\n\n" + table.markdown())
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parser() -> argparse.ArgumentParser:
    p = U.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--nproc", type=int, default=None,
                   help="processes to start when not under torchrun (default: every GPU; 2 on "
                        "a CPU); 1 runs the 1-GPU rows only")
    p.add_argument("--dist-timeout-s", type=float, default=600,
                   help="process-group timeout: a rank stuck in a collective fails after it")
    p.set_defaults(rep_ms=300)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        return worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, "env://")
    cuda = U.pick_device(args.device).type == "cuda"
    n = args.nproc or (torch.cuda.device_count() if cuda else 2)
    if n <= 1:
        return worker(0, 1, args, None)
    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=(n, args, f"tcp://127.0.0.1:{_free_port()}"),
                             nprocs=n, join=False, start_method="spawn")
    try:
        while not ctx.join():
            pass
    except Exception as e:  # a rank raised or died: the others are ended below
        print(f"[bench_cp] {type(e).__name__}: {e}".splitlines()[0][:400], file=sys.stderr)
        return 1
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
