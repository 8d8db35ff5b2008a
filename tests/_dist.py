"""Run a function on N CPU processes joined in a gloo process group (multi-process tests).

    from _dist import run_ranks
    results = run_ranks(fn, world_size=2, args=(...,), timeout_s=120)   # [fn(...) of rank 0, ...]

``fn(rank, world_size, *args)`` must be a module-level function (the children import it by
name: torch.multiprocessing's spawn start method). Each child sets one intra-op thread, joins
``torch.distributed`` with the gloo backend through a file rendezvous in a fresh temporary
folder, runs ``fn`` and saves what it returns with ``torch.save`` (tensors, numbers, lists,
dicts). A child that raises fails the call with its traceback; a group that has not finished
within ``timeout_s`` (a deadlock: a rank waiting in a collective the others never join) is
killed and the call raises ``TimeoutError``, so a test fails instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _child(rank: int, fn, world_size: int, args: tuple, folder: str) -> None:
    torch.set_num_threads(1)
    out = Path(folder)
    try:
        dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, out / f"result_{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the parent as text
        (out / f"error_{rank}.txt").write_text(traceback.format_exc())
        raise


def run_ranks(fn, world_size: int, args: tuple = (), timeout_s: float = 120.0) -> list:
    """[rank 0's result, rank 1's, ...] of ``fn(rank, world_size, *args)`` on ``world_size``
    gloo processes. RuntimeError with the child's traceback if one raised; TimeoutError after
    ``timeout_s`` seconds (all children killed)."""
    with tempfile.TemporaryDirectory(prefix="pyops_dist_") as folder:
        ctx = mp.start_processes(_child, args=(fn, world_size, args, folder), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks of {fn.__name__} did not finish in "
                                       f"{timeout_s:.0f} s (a collective some rank never joined?)")
        except mp.ProcessRaisedException as e:
            errors = sorted(Path(folder).glob("error_*.txt"))
            detail = "\n".join(p.read_text() for p in errors) or str(e)
            raise RuntimeError(f"a rank of {fn.__name__} failed:\n{detail}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(Path(folder) / f"result_{r}.pt", weights_only=False)
                for r in range(world_size)]
