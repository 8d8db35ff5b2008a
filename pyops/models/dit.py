"""A compact DiT with adaLN-Zero blocks: the embedded default model of pyops.

Tokens in, tokens out: ``DiT(cfg)(x, t)`` with x (B, N, in_channels) and t (B,) in [0, 1].
Each block: LayerNorm -> adaLN modulate -> self-attention (SDPA) -> gated residual, then
LayerNorm -> modulate -> GELU(tanh) MLP -> gated residual; six modulation vectors per block from
the timestep embedding (Peebles & Xie's adaLN-Zero layout, as in Flux/SD3/Wan single streams).

``DiT.random(cfg, seed)`` fills weights with seeded random values, with a few input channels of
each linear scaled up (outlier channels, as trained DiT weights have), and a non-zero adaLN
output so every block contributes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DiTConfig:
    hidden: int = 1152
    depth: int = 4
    heads: int = 16
    in_channels: int = 64
    mlp_ratio: float = 4.0
    freq_dim: int = 256


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device,
                                                           dtype=torch.float32) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp = int(hidden * mlp_ratio)
        self.fc1 = nn.Linear(hidden, mlp)
        self.fc2 = nn.Linear(mlp, hidden)
        self.adaLN_modulation = nn.Linear(hidden, 6 * hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(F.silu(c)).chunk(6, dim=-1)
        h = modulate(self.norm1(x), sh1, sc1)
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + g1.unsqueeze(1) * self.proj(a)
        h = modulate(self.norm2(x), sh2, sc2)
        x = x + g2.unsqueeze(1) * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
        return x

    def forward_rows(self, x: torch.Tensor, c: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for the token rows ``tokens`` only: equals ``forward(x, c)[:, tokens]``.

        x: (B, N, D) hidden states; c: (B, D) conditioning; tokens: (T,) int64 indices into the N
        tokens (device tensor, values in [0, N): not checked on the host, which would sync).
        Returns (B, T, D) in x's dtype. The selected rows' queries attend to the keys and values
        of all N tokens, so only the attention keys/values are computed for every token; the
        output projection and the MLP run on T rows. Used by the chunk level of
        :mod:`pyops.cache`, which recomputes the tokens whose input changed most.

        Raises ``ValueError`` if x is not 3-D or tokens is not a 1-D int64 tensor.
        """
        if x.dim() != 3:
            raise ValueError(f"DiTBlock.forward_rows: x must be (B, N, D), got {tuple(x.shape)}")
        if tokens.dim() != 1 or tokens.dtype != torch.int64:
            raise ValueError(f"DiTBlock.forward_rows: tokens must be a 1-D int64 tensor, got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        B, N, D = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(F.silu(c)).chunk(6, dim=-1)
        h = modulate(self.norm1(x), sh1, sc1)
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q = q.index_select(2, tokens)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, D)
        xs = x.index_select(1, tokens) + g1.unsqueeze(1) * self.proj(a)
        h = modulate(self.norm2(xs), sh2, sc2)
        return xs + g2.unsqueeze(1) * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig = DiTConfig()):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden
        self.x_embedder = nn.Linear(cfg.in_channels, D)
        self.t_embedder = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Linear(D, 2 * D)
        self.proj_out = nn.Linear(D, cfg.in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(timestep_embedding(t, self.cfg.freq_dim).to(x.dtype))
        h = self.x_embedder(x)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.adaLN_out(F.silu(c)).chunk(2, dim=-1)
        return self.proj_out(modulate(self.norm_out(h), shift, scale))

    @classmethod
    def random(cls, cfg: DiTConfig = DiTConfig(), seed: int = 0, outlier_channels: int = 4,
               outlier_gain: float = 8.0) -> "DiT":
        model = cls(cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    w = torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features)
                    idx = torch.randperm(m.in_features, generator=g)[:outlier_channels]
                    w[:, idx] *= outlier_gain
                    m.weight.copy_(w)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
            for blk in model.blocks:  # small gates: a stable residual stream
                blk.adaLN_modulation.weight.mul_(0.1)
        return model
