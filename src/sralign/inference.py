"""Super-resolving whole images: seeded noise, tiling with overlap, colour fix."""

from __future__ import annotations

import torch
from torch import Tensor

from .colorfix import color_fix
from .policies.base import SRPolicy


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> Tensor:
    w = torch.ones(n)
    if overlap > 0:
        ramp = torch.linspace(0, 1, overlap + 2)[1:-1]
        if not at_start:
            w[:overlap] = ramp
        if not at_end:
            w[n - overlap :] = ramp.flip(0)
    return w


def _starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    s = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(s))


@torch.no_grad()
def super_resolve(
    policy: SRPolicy,
    lr: Tensor,
    *,
    seed: int = 0,
    sampler: str = "ode",
    steps: int = 20,
    tile: int = 128,
    overlap: int = 16,
    colorfix: str = "none",
) -> Tensor:
    """SR one image ``lr`` [3,h,w] in [0,1] -> [3,s·h,s·w] in [0,1].

    The noise for the whole output is drawn once from ``seed``; images larger than ``tile`` LR
    pixels are processed in tiles overlapping by ``overlap`` LR pixels and blended linearly, so
    the result does not depend on how many tiles were needed beyond the seams.
    """
    s = policy.scale
    _, h, w = lr.shape
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 3, h * s, w * s), generator=g)
    extra = {"generator": g} if sampler == "sde" else {}  # sde draws per-step noise: seed it too
    if tile <= 0 or (h <= tile and w <= tile):
        cond = policy.condition(lr[None])
        out = policy.sample(cond, noise, sampler=sampler, steps=steps, **extra).images[0]
    else:
        overlap = max(0, min(overlap, tile // 2))
        acc = torch.zeros(3, h * s, w * s)
        wsum = torch.zeros(1, h * s, w * s)
        ys, xs = _starts(h, tile, tile - overlap), _starts(w, tile, tile - overlap)
        for y in ys:
            for x in xs:
                th, tw = min(tile, h), min(tile, w)
                cond = policy.condition(lr[None, :, y : y + th, x : x + tw])
                nz = noise[:, :, y * s : (y + th) * s, x * s : (x + tw) * s]
                img = policy.sample(cond, nz, sampler=sampler, steps=steps, **extra).images[0].cpu()
                wy = _ramp(th * s, overlap * s, y == 0, y + th >= h)
                wx = _ramp(tw * s, overlap * s, x == 0, x + tw >= w)
                wt = (wy[:, None] * wx[None, :])[None]
                acc[:, y * s : (y + th) * s, x * s : (x + tw) * s] += img * wt
                wsum[:, y * s : (y + th) * s, x * s : (x + tw) * s] += wt
        out = acc / wsum
    if colorfix != "none":
        up = torch.nn.functional.interpolate(lr[None], scale_factor=s, mode="bicubic", align_corners=False).clamp(0, 1)
        out = color_fix(out[None], up, colorfix)[0]
    return out.clamp(0, 1)
