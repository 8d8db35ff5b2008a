"""Chunk scatter: the fused output and cache update of the chunk level of :mod:`pyops.cache`; the
reference, and the spec for every backend.

At a partial step the chunk level recomputes the block on T token rows (``rows``, the block's
output at ``tokens``) and reuses the cached residual everywhere else. One pass writes the block's
output and refreshes the cache at the recomputed tokens. Shapes: ``x``, ``res``, ``ref``, ``out``
(B, N, D); ``rows`` (B, T, D); ``tokens`` (T,) int64; one float dtype (fp32 / fp16 / bf16).

With ``pos[n] = t`` where ``tokens[t] == n`` and ``pos[n] = -1`` for the tokens not listed
(entries outside [0, N) are ignored; the entries must be distinct, for a repeated token the row
used is unspecified):

    out[b, n] = rows[b, pos[n]]                            pos[n] >= 0  (bits copied)
              = rnd(fp32(x[b, n]) + fp32(res[b, n]))       pos[n] <  0
    res[b, n] = rnd(fp32(rows[b, pos[n]]) − fp32(x[b, n]))  pos[n] >= 0  (else unchanged)
    ref[b, n] = x[b, n]                                    pos[n] >= 0  (else unchanged; bits)

``rnd``: one round-to-nearest-even of the fp32 result to the tensors' dtype, what torch's own
``x + res`` / ``rows - x`` compute for these dtypes, so the fused op equals the unfused update
``out = x + res; out[:, tokens] = rows; res[:, tokens] = rows - x[:, tokens];
ref[:, tokens] = x[:, tokens]`` bit for bit. ``out`` is written everywhere and read nowhere.
"""
from __future__ import annotations

import torch


def positions(tokens: torch.Tensor, N: int) -> torch.Tensor:
    """(N,) int64: ``pos[n]`` = the index t with ``tokens[t] == n``, -1 where none (entries
    outside [0, N) ignored). Device ops only, no sync."""
    T = tokens.numel()
    valid = (tokens >= 0) & (tokens < N)
    idx = torch.where(valid, tokens, N)  # ignored entries land in a spill slot
    pos = torch.full((N + 1,), -1, dtype=torch.int64, device=tokens.device)
    pos.scatter_(0, idx, torch.arange(T, dtype=torch.int64, device=tokens.device))
    return pos[:N]


def chunk_scatter(out: torch.Tensor, x: torch.Tensor, res: torch.Tensor, rows: torch.Tensor,
                  tokens: torch.Tensor, ref: torch.Tensor) -> None:
    """Destination-passing reference: writes ``out``, updates ``res`` and ``ref`` in place."""
    N = x.shape[1]
    pos = positions(tokens, N)
    sel = (pos >= 0).view(1, N, 1)
    r = rows.index_select(1, pos.clamp_min(0))  # (B, N, D): each token's recomputed row
    xf = x.float()
    out.copy_(torch.where(sel, r, (xf + res.float()).to(out.dtype)))  # before res changes
    res.copy_(torch.where(sel, (r.float() - xf).to(res.dtype), res))
    ref.copy_(torch.where(sel, x, ref))
