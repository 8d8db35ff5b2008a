"""The counters of :class:`pyops.cache.CachedModel` as a plain dict (``handle.stats``).

What is counted, per gated region (step level: the one gated middle, key ``-1``; block and chunk
levels: one entry per gated block, keyed by the block's index):

* ``checks``: decisions the region made, one per forward through it (step and block levels: one
  :func:`pyops.block_similarity` call each; chunk level: one forward of the block, full or
  partial, decided by its step machine);
* ``hits`` / ``misses``: units reused / computed. The unit is the region at the step and block
  levels (``hits + misses == checks``), a token chunk at the chunk level (``hits + misses ==
  checks × chunks``: a full step computes every chunk, a partial step ``budget`` of them);
* ``skipped``: ``hits / (hits + misses)``, 0.0 when nothing was counted (never 0/0);
* ``blocks``: gated blocks per region (step level: every block between the first ``fn`` and the
  last ``bn``; block and chunk levels: 1); chunk level also ``chunks``, ``full`` and ``partial``
  (steps that ran the full block / the chunk path).

Totals (top level and per context): sums of ``checks``, ``hits``, ``misses``; ``skipped`` is the
fraction of gated block computes skipped, ``Σ hits·w / Σ (hits + misses)·w`` with ``w`` the
blocks one unit stands for (step level: the gated blocks, so it equals hits / checks; block level:
1; chunk level: 1 / chunks, a chunk being that share of a block's token rows). The always-computed
blocks (the first ``fn`` and the last ``bn``) are not part of it. At the chunk level a partial step
still computes every token's attention keys and values, so ``skipped`` counts reused token rows,
not FLOPs.

CFG: ``cfg_batched`` halves share one decision (the check ANDs them), so a forward counts once;
contexts (``alternate_contexts`` / ``CachedModel.context``) each have their own regions, reported
under ``"contexts"`` by name, and summed per region key in the top-level ``"regions"``.

Every count is kept on the device (an int64 tally per region, ``Σ`` of the decision flags, one
add per decision captured with it), so CUDA-graph replays count too; this module reads them.

In a capture without IF nodes (``pyops.graphs.supported()`` false) every block still runs and the
cache is applied by a device-side select: hits then count decisions, not saved work.
"""
from __future__ import annotations

import torch

from .regions import ChunkRegion


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _read(tensors: list) -> list:
    """Host lists of the values of ``tensors``: one device sync per device."""
    out: list = [None] * len(tensors)
    by_dev: dict = {}
    for i, t in enumerate(tensors):
        by_dev.setdefault(t.device, []).append(i)
    for idx in by_dev.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).tolist()
        pos = 0
        for i in idx:
            n = tensors[i].numel()
            out[i], pos = flat[pos:pos + n], pos + n
    return out


def _entry(r, tally, *, blocks: int, chunks: int, budget: int) -> dict:
    if isinstance(r, ChunkRegion):  # tally: [forwards, partial steps]
        forwards, partial = (int(tally[0]), int(tally[1])) if tally is not None else (0, 0)
        full = forwards - partial
        hits = partial * (chunks - budget)
        misses = full * chunks + partial * budget
        return {"checks": forwards, "hits": hits, "misses": misses,
                "skipped": _ratio(hits, hits + misses), "blocks": 1, "chunks": chunks,
                "full": full, "partial": partial}
    checks, hits = 0, 0
    if tally is not None:  # (2, groups) flattened; the groups share one decision
        g = len(tally) // 2
        checks, hits = int(tally[0]), int(tally[g])
    return {"checks": checks, "hits": hits, "misses": checks - hits,
            "skipped": _ratio(hits, checks), "blocks": blocks}


def _merge(entries: list) -> dict:
    """One region's entries of several contexts summed."""
    out = dict(entries[0])
    for e in entries[1:]:
        for k in ("checks", "hits", "misses", "full", "partial"):
            if k in out:
                out[k] += e[k]
    out["skipped"] = _ratio(out["hits"], out["hits"] + out["misses"])
    return out


def _total(regions: dict) -> dict:
    num = den = 0.0
    for e in regions.values():
        w = e["blocks"] / e.get("chunks", 1)
        num += e["hits"] * w
        den += (e["hits"] + e["misses"]) * w
    return {"checks": sum(e["checks"] for e in regions.values()),
            "hits": sum(e["hits"] for e in regions.values()),
            "misses": sum(e["misses"] for e in regions.values()),
            "skipped": _ratio(num, den)}


def snapshot(contexts: dict, *, step_blocks: int, chunks: int, budget: int) -> dict:
    """The stats dict (module docstring) of ``contexts`` ({name: {key: region}}).

    ``step_blocks``: gated blocks of the step level's region (key -1). Reads the device tallies
    with one sync per device; raises ``RuntimeError`` inside a CUDA-graph capture."""
    from .. import graphs as _graphs
    if _graphs.capturing():
        raise RuntimeError("pyops.cache: stats read the device counters (a sync); read them "
                           "outside the CUDA-graph capture")
    items = [(name, key, r) for name, regs in contexts.items() for key, r in regs.items()]
    dev = [(i, r.tally) for i, (_, _, r) in enumerate(items) if r.tally is not None]
    vals = dict(zip((i for i, _ in dev), _read([t for _, t in dev])))
    per_ctx: dict = {}
    for i, (name, key, r) in enumerate(items):
        e = _entry(r, vals.get(i), blocks=step_blocks if key == -1 else 1, chunks=chunks,
                   budget=budget)
        per_ctx.setdefault(name, {})[key] = e
    merged: dict = {}
    for regs in per_ctx.values():
        for key, e in regs.items():
            merged.setdefault(key, []).append(e)
    regions = {k: _merge(v) for k, v in sorted(merged.items())}
    out = _total(regions)
    out["regions"] = regions
    out["contexts"] = {name: dict(_total(regs), regions=dict(sorted(regs.items())))
                       for name, regs in per_ctx.items()}
    return out
