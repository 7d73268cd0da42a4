"""A small conditional UNet without attention (CPU-friendly), used by the tiny policy.

Input: the noisy state x_t [B,3,H,W] and LR features [B,Cc,H,W]; output: a velocity [B,3,H,W].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class UNetConfig:
    channels: tuple[int, ...] = (16, 64, 128)
    blocks_per_level: int = 1
    cond_channels: int = 16
    time_dim: int = 128
    groups: int = 8


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of noise levels ``t`` [B] in [0,1] (scaled to the 1000-step range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32).to(t.dtype) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(time_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class CondEncoder(nn.Module):
    """Encodes the upsampled LR [B,3,H,W] in [-1,1] into features [B,Cc,H,W]."""

    def __init__(self, cout: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, cout, 3, padding=1), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )

    def forward(self, lr_up: Tensor) -> Tensor:
        return self.net(lr_up)


class TinyUNet(nn.Module):
    """Denoiser v_θ(x_t, t, features). Spatial size must be divisible by 2**(levels-1)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = list(cfg.channels)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim)
        )
        self.conv_in = nn.Conv2d(3 + cfg.cond_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = ch[0]
        skips = []
        for i, co in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(c, co, cfg.time_dim, cfg.groups))
                c = co
            self.down.append(blocks)
            skips.append(c)
            self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(ch) - 1 else nn.Identity())
        self.mid = ResBlock(c, c, cfg.time_dim, cfg.groups)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, co in reversed(list(enumerate(ch))):
            blocks = nn.ModuleList()
            for j in range(cfg.blocks_per_level):
                blocks.append(ResBlock(c + (skips[i] if j == 0 else 0), co, cfg.time_dim, cfg.groups))
                c = co
            self.up.append(blocks)
            self.upsample.append(nn.Conv2d(c, ch[i - 1], 3, padding=1) if i > 0 else nn.Identity())
            if i > 0:
                c = ch[i - 1]
        self.norm_out = nn.GroupNorm(cfg.groups, c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.cfg.channels) - 1)

    def forward(self, x: Tensor, t: Tensor, features: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.time_dim))
        h = self.conv_in(torch.cat([x, features], dim=1))
        skips = []
        for blocks, down in zip(self.down, self.downsample):
            for b in blocks:
                h = b(h, emb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, emb)
        for blocks, up in zip(self.up, self.upsample):
            h = torch.cat([h, skips.pop()], dim=1)
            for b in blocks:
                h = b(h, emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
