"""Super-resolving whole images: seeded noise, tiling with overlap, colour fix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .colorfix import color_fix
from .policies.base import STOCHASTIC_SAMPLERS, SRPolicy, condition_with_prompts, noise_layout, policy_noise


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
    prompt: str | None = None,
) -> Tensor:
    """SR one image ``lr`` [3,h,w] in [0,1] -> [3,s·h,s·w] in [0,1].

    The noise for the whole output is drawn once from ``seed`` in the policy's own space (pixels,
    or VAE latents laid out spatially, see ``noise_layout``); images larger than ``tile`` LR
    pixels are processed in tiles overlapping by ``overlap`` LR pixels, each tile taking its crop
    of that noise, and blended linearly in pixel space — so a latent backend never holds more
    than one tile's latents, and the result does not depend on the tiling beyond the seams.
    Sizes a latent backend cannot take (output not a multiple of its VAE factor) are padded by
    reflection and cropped back. ``prompt``: text for text-conditioned policies.
    """
    s = policy.scale
    channels, factor, multiple = noise_layout(policy)
    q = multiple // math.gcd(multiple, s)  # LR pixels per alignment unit
    _, h0, w0 = lr.shape
    lr = _pad_to(lr, q)
    _, h, w = lr.shape
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, channels, h * s // factor, w * s // factor), generator=g)
    extra = {"generator": g} if sampler in STOCHASTIC_SAMPLERS else {}  # sde / ddpm draw per-step noise: seed it too
    prompts = None if prompt is None else [prompt]

    def run(lr_tile: Tensor, y: int, x: int) -> Tensor:
        th, tw = lr_tile.shape[-2:]
        cond = condition_with_prompts(policy, lr_tile[None], prompts)
        nz = noise[:, :, y * s // factor : (y + th) * s // factor, x * s // factor : (x + tw) * s // factor]
        return policy.sample(cond, policy_noise(policy, nz), sampler=sampler, steps=steps, **extra).images[0].cpu()

    if tile > 0:
        tile = max(q, tile // q * q)
    if tile <= 0 or (h <= tile and w <= tile):
        out = run(lr, 0, 0)
    else:
        overlap = max(0, min(overlap, tile // 2)) // q * q
        acc = torch.zeros(3, h * s, w * s)
        wsum = torch.zeros(1, h * s, w * s)
        ys, xs = _starts(h, tile, tile - overlap), _starts(w, tile, tile - overlap)
        for y in ys:
            for x in xs:
                th, tw = min(tile, h), min(tile, w)
                img = run(lr[:, y : y + th, x : x + tw], y, x)
                wy = _ramp(th * s, overlap * s, y == 0, y + th >= h)
                wx = _ramp(tw * s, overlap * s, x == 0, x + tw >= w)
                wt = (wy[:, None] * wx[None, :])[None]
                acc[:, y * s : (y + th) * s, x * s : (x + tw) * s] += img * wt
                wsum[:, y * s : (y + th) * s, x * s : (x + tw) * s] += wt
        out = acc / wsum
    out = out[:, : h0 * s, : w0 * s]
    if colorfix != "none":
        up = torch.nn.functional.interpolate(lr[None, :, :h0, :w0], scale_factor=s, mode="bicubic", align_corners=False).clamp(0, 1)
        out = color_fix(out[None], up, colorfix)[0]
    return out.clamp(0, 1)


def _pad_to(img: Tensor, q: int) -> Tensor:
    """Pad [3,h,w] at the bottom/right to multiples of ``q`` (reflect; replicate when too small)."""
    _, h, w = img.shape
    ph, pw = -h % q, -w % q
    if ph == 0 and pw == 0:
        return img
    mode = "reflect" if ph < h and pw < w else "replicate"
    return torch.nn.functional.pad(img[None], (0, pw, 0, ph), mode=mode)[0]
