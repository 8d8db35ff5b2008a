"""Rank-consistent cache decisions under context (sequence) parallelism.

Under context parallelism every rank holds a shard of the tokens, so the relative L1 that
:func:`pyops.block_similarity` measures differs from rank to rank. If each rank decided alone,
one rank could skip a region whose blocks the other ranks compute, and the collectives inside
those blocks (the attention's all-to-all / all-gather) would wait forever or mix stale and fresh
tokens. With a process group the check is split in two:

1. :func:`reduce_sums`: per decision group (CFG half) ``[Σ|a−ref|, Σ|ref|, fresh]`` in fp32 over
   this rank's shard, then **one** ``all_reduce(SUM)`` of that (groups, 3) tensor over the
   group, on the device (no ``.item()``, no host sync; NCCL all-reduce is CUDA-graph
   capturable; under ``torch.compile`` the functional collective is used). ``fresh`` is 1 on a
   rank whose cache was just (re)allocated (first call, new shape, after an error); a group
   where any rank is fresh restarts its step counter on every rank, so warm-up restarts
   everywhere at once.
2. :func:`decide_from_sums`: the decision of the same :func:`pyops.block_similarity` op (any
   backend), run on a (groups, 1, 2) fp32 pair whose sums are the global sums exactly:
   ``a' = [D, N]``, ``ref' = [0, N]`` gives ``Σ|a'−ref'| = D + 0`` and ``Σ|ref'| = 0 + N``
   (exact in fp32), hence the metric ``D / max(N, eps)`` and every rule, state update and
   ``all_groups`` AND of the op unchanged. Then this rank's own ``ref`` shard is written where
   the (global) decision says so (``write_ref`` as in the op).

Every rank then holds the same sums (an all-reduce delivers the one reduced value to every rank:
NCCL's maintainers state it for ring and tree, NVIDIA/nccl#855; the gloo tests check it), the same
state and therefore the same decision. The sums are the unsharded tensor's sums up to fp32
summation order; a tensor replicated on every rank instead of sharded multiplies D and N by the
same world size, which leaves the relative L1 unchanged (up to one rounding).

With no group, or a group of one rank, none of this runs: the cache calls the fused op alone.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..ops.block_similarity import RULES, WRITE_REF, block_similarity
from .regions import persistent

SUMS = 3  # columns of the all-reduced tensor: Σ|a−ref|, Σ|ref|, fresh


def _dist():
    import torch.distributed as dist
    return dist


def as_group(spec: Any):
    """A ProcessGroup from ``spec``: a ``torch.distributed.ProcessGroup`` or a 1-D
    ``DeviceMesh`` (its group). Raises ``TypeError`` for anything else, ``ValueError`` for a mesh
    with more than one dimension, ``RuntimeError`` when torch.distributed is not initialized."""
    dist = _dist()
    from torch.distributed.device_mesh import DeviceMesh
    if not isinstance(spec, (DeviceMesh, dist.ProcessGroup)):
        raise TypeError(f"pyops.cache: process_group must be a torch.distributed ProcessGroup, "
                        f"a 1-D DeviceMesh or None, got {type(spec).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("pyops.cache: process_group is set but torch.distributed is not "
                           "initialized (call torch.distributed.init_process_group first)")
    if isinstance(spec, DeviceMesh):
        if spec.ndim != 1:
            raise ValueError(f"pyops.cache: process_group mesh has {spec.ndim} dimensions; pass "
                             f"the 1-D mesh (or its flattened view) of the ranks that share the "
                             f"tokens")
        return spec.get_group()
    return spec


def diffusers_mesh(model: Any):
    """The context-parallel mesh of a diffusers model after ``enable_parallelism`` (diffusers
    0.42: ``model._parallel_config.context_parallel_config._flattened_mesh``, the ring × ulysses
    ranks, i.e. every rank holding a token shard), or None."""
    cp = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    return getattr(cp, "_flattened_mesh", None)


def resolve_group(spec: Any, model: Any = None):
    """The group whose ranks must take the same decisions, or None (decide locally).

    ``spec``: ``CacheConfig.process_group``; None means the diffusers context-parallel mesh of
    ``model`` if it has one. A group of one rank gives None (the single-process path)."""
    if spec is None:
        spec = diffusers_mesh(model)
        if spec is None:
            return None
    group = as_group(spec)
    return None if _dist().get_world_size(group) == 1 else group


def all_reduce_sum_(t: torch.Tensor, group) -> torch.Tensor:
    """In-place SUM all-reduce of ``t`` over ``group`` on ``t``'s device: ``dist.all_reduce``
    eagerly (a CUDA-graph capture records it), the functional collective while
    ``torch.compile`` traces (traceable, no graph break). No host sync. Returns ``t``."""
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as fcol
        t.copy_(fcol.all_reduce(t, "sum", group))
    else:
        dist = _dist()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def new_buffers(groups: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, pair)``: (groups, 3) and (2, groups, 1, 2) fp32 zeros (``pair[1, :, 0, 0]`` must
    stay 0: it is ``ref'``'s first element)."""
    with persistent():
        return (torch.zeros((groups, SUMS), dtype=torch.float32, device=device),
                torch.zeros((2, groups, 1, 2), dtype=torch.float32, device=device))


def _check_inputs(a: torch.Tensor, ref: torch.Tensor, state: torch.Tensor, sums, pair,
                  groups: int) -> None:
    if ref.shape != a.shape or ref.dtype != a.dtype or not ref.is_contiguous():
        raise ValueError(f"pyops.cache: ref {tuple(ref.shape)} {ref.dtype} must be contiguous "
                         f"and match a {tuple(a.shape)} {a.dtype}")
    if a.dim() == 0 or groups < 1 or a.shape[0] % groups:
        raise ValueError(f"pyops.cache: batch of a {tuple(a.shape)} not divisible by "
                         f"groups={groups}")
    if tuple(state.shape) != (groups, 4) or state.dtype != torch.float32:
        raise ValueError(f"pyops.cache: state must be ({groups}, 4) fp32")
    if sums is not None and (tuple(sums.shape) != (groups, SUMS) or sums.dtype != torch.float32
                             or not sums.is_contiguous()):
        raise ValueError(f"pyops.cache: sums must be contiguous ({groups}, {SUMS}) fp32")
    if pair is not None and (tuple(pair.shape) != (2, groups, 1, 2)
                             or pair.dtype != torch.float32 or not pair.is_contiguous()):
        raise ValueError(f"pyops.cache: pair must be contiguous (2, {groups}, 1, 2) fp32")


def reduce_sums(a: torch.Tensor, ref: torch.Tensor, state: torch.Tensor, sums: torch.Tensor,
                group, *, groups: int = 1, fresh: bool = False) -> torch.Tensor:
    """Write ``sums[g] = [Σ|a−ref|, Σ|ref|, fresh]`` over this rank's rows of group ``g`` (fp32,
    ``a − ref`` formed in fp32 as the op does), all-reduce them (SUM) over ``group``, then zero
    the ``state`` rows of every group where some rank was ``fresh``. Device ops only: transient
    fp32 tensor of ``a``'s size, a few small launches and one all-reduce of ``groups × 3``
    floats. Returns ``sums``."""
    _check_inputs(a, ref, state, sums, None, groups)
    av, bv = a.reshape(groups, -1), ref.reshape(groups, -1)
    diff = av.to(torch.float32, copy=True)  # one transient fp32 buffer, a - ref in place
    d = torch.linalg.vector_norm(diff.sub_(bv), ord=1, dim=1)
    n = torch.linalg.vector_norm(bv, ord=1, dim=1, dtype=torch.float32)
    torch.stack((d, n, torch.full_like(d, 1.0 if fresh else 0.0)), dim=1, out=sums)
    all_reduce_sum_(sums, group)
    state.masked_fill_(sums[:, 2:3] != 0, 0.0)
    return sums


def decide_from_sums(a: torch.Tensor, ref: torch.Tensor, state: torch.Tensor,
                     sums: torch.Tensor, pair: torch.Tensor, *, threshold: float,
                     rule: str = "last_computed", warmup: int = 1, max_reuse: int = -1,
                     num_steps: int = 0, last_steps: int = 0, groups: int = 1,
                     all_groups: bool = False, write_ref: Optional[str] = None,
                     eps: float = 1e-12, metric: Optional[torch.Tensor] = None,
                     reuse: Optional[torch.Tensor] = None, backend: Optional[str] = None):
    """Decide from the (already all-reduced) ``sums`` with :func:`pyops.block_similarity` on
    the exact pair ``a' = [D, N]``, ``ref' = [0, N]`` (same metric, rules, state update), then
    write this rank's ``ref`` where the op would (``write_ref``: "on_compute" default for rule
    "last_computed": rows of the groups that compute; "always" default for "accumulate";
    "never"). Returns ``(reuse, metric)`` as the op does. One difference from the fused op: a
    global ``Σ|ref| = inf`` gives a NaN metric here (``inf − inf`` in the pair), so such a step
    is computed, never reused."""
    _check_inputs(a, ref, state, sums, pair, groups)
    wr = write_ref if write_ref is not None else (
        "on_compute" if RULES.get(rule, rule) == 0 else "always")
    if wr not in WRITE_REF:
        raise ValueError(f"pyops.cache: write_ref={wr!r}; expected one of {sorted(WRITE_REF)}")
    pair[0, :, 0, :].copy_(sums[:, :2])
    pair[1, :, 0, 1].copy_(sums[:, 1])
    reuse, metric = block_similarity(
        pair[0], pair[1], state, threshold=threshold, rule=rule, warmup=warmup,
        max_reuse=max_reuse, num_steps=num_steps, last_steps=last_steps, groups=groups,
        all_groups=all_groups, write_ref="never", eps=eps, metric=metric, reuse=reuse,
        backend=backend)
    if wr == "always":
        ref.copy_(a)
    elif wr == "on_compute":
        rv = ref.view(groups, -1)
        rv.copy_(torch.where(reuse.view(groups, 1) != 0, rv, a.reshape(groups, -1)))
    return reuse, metric


def block_similarity_cp(a: torch.Tensor, ref: torch.Tensor, state: torch.Tensor, *, group,
                        groups: int = 1, fresh: bool = False,
                        sums: Optional[torch.Tensor] = None, pair: Optional[torch.Tensor] = None,
                        **kwargs):
    """:func:`pyops.block_similarity` (``chunks=1``) with the decision taken from sums
    all-reduced over ``group``: every rank of the group gets the same ``(reuse, metric)`` and
    the same ``state``. ``a``/``ref``: this rank's shard (contiguous, same shape and dtype,
    batch first; shards may differ in size between ranks); ``state``: (groups, 4) fp32.
    ``group`` None: exactly :func:`pyops.block_similarity` (one fused launch). ``sums``/``pair``:
    static buffers from :func:`new_buffers` (allocated when omitted). ``kwargs``: the op's
    threshold, rule, warmup, max_reuse, num_steps, last_steps, all_groups, write_ref, eps,
    metric, reuse, backend. Every rank of ``group`` must call it, in the same order.
    Raises ``ValueError`` for mismatched buffers (before any launch or collective)."""
    if group is None:
        return block_similarity(a, ref, state, groups=groups, **kwargs)
    thr, eps = kwargs.get("threshold"), kwargs.get("eps", 1e-12)
    if thr is None or not (thr >= 0.0) or not (eps > 0.0):
        raise ValueError(f"pyops.cache: threshold must be >= 0 and eps > 0, got {thr}, {eps}")
    rule = kwargs.get("rule", "last_computed")
    if rule not in RULES and rule not in RULES.values():
        raise ValueError(f"pyops.cache: rule={rule!r}; expected one of "
                         f"{sorted(RULES)}")
    if sums is None or pair is None:
        sums, pair = new_buffers(groups, a.device)
    _check_inputs(a, ref, state, sums, pair, groups)
    reduce_sums(a, ref, state, sums, group, groups=groups, fresh=fresh)
    return decide_from_sums(a, ref, state, sums, pair, groups=groups, **kwargs)


def chunk_error() -> ValueError:
    return ValueError(
        "pyops.cache: level='chunk' is not available under context parallelism (a process "
        "group of more than one rank): its partial path recomputes a subset of token rows "
        "whose queries attend to the keys/values of all tokens, and pyops DiT blocks have no "
        "context-parallel path for that. Use level='step' or 'block', whose decisions are "
        "all-reduced across the group")


def split_hook_block(blocks, indices) -> Optional[int]:
    """The first of ``indices`` whose block carries diffusers' context-parallel input hook
    (``enable_parallelism`` splits that block's inputs across the ranks, diffusers 0.42.1:
    ``hooks/context_parallel.py``, hook names ``cp_input---<module>``; Wan's plan splits
    ``blocks.0``), or None. A cache wrapper installed over such a hook would see the whole
    sequence going in and this rank's shard coming out."""
    for i in indices:
        hooks = getattr(getattr(blocks[i], "_diffusers_hook", None), "hooks", None)
        if isinstance(hooks, dict) and any(str(k).startswith("cp_input---") for k in hooks):
            return i
    return None


def split_hook_error(i: int, block) -> ValueError:
    return ValueError(
        f"pyops.cache_model: block {i} ({type(block).__name__}) already splits its inputs "
        f"across the context-parallel ranks (diffusers' enable_parallelism ran first and its "
        f"plan splits at this block, e.g. Wan's blocks.0): the cache would see the whole "
        f"sequence going in and one rank's shard coming out. Call pyops.cache_model before "
        f"enable_parallelism (the cache then sees the shards), or gate from a later block "
        f"(CacheConfig.fn)")
