"""Super-resolving whole images: seeded noise, tiling with overlap, colour fix."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

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


class StreamedRandn:
    """Pieces of ``torch.randn(numel, generator=torch.Generator().manual_seed(seed))`` (CPU,
    float32), read front to back without ever holding the whole tensor.

    How torch fills a float32 normal tensor of ≥ 16 elements: one uniform draw per element, then
    every block of 16 becomes 16 normals (Box–Muller on the block's two halves); when ``numel`` is
    not a multiple of 16 the last 16 elements are redone from 16 further uniforms. An element thus
    depends only on the uniforms of its block, and a block-aligned piece can be drawn on its own
    from the generator advanced past the earlier uniforms. ``tests/test_inference.py`` checks the
    pieces against ``torch.randn`` itself, so a torch that draws differently is caught.

    ``read(a, b)`` returns elements [a, b); successive reads must not start before the previous
    read's start (they may overlap it). Memory: the span of the last read.
    """

    CHUNK = 1 << 22  # uniforms drawn per call while skipping

    def __init__(self, numel: int, seed: int):
        self.numel, self.seed = numel, seed
        self.full = numel // 16 * 16 if numel >= 16 else 0
        self.g = torch.Generator().manual_seed(seed)
        self.pos = 0  # uniforms drawn so far (a multiple of 16)
        self.buf, self.buf_start = torch.empty(0), 0  # normals [buf_start, buf_start + len(buf))
        self._tail: Tensor | None = None
        self._small = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) if numel < 16 else None

    def _skip(self, to: int) -> None:
        scratch = torch.empty(min(self.CHUNK, max(0, to - self.pos)))
        while self.pos < to:
            k = min(to - self.pos, self.CHUNK)
            scratch[:k].uniform_(generator=self.g)
            self.pos += k

    def fork(self, start: int) -> "StreamedRandn":
        """A reader of the same tensor positioned to read from ``start`` on (this one is advanced
        there too; forks at increasing starts cost one pass over the uniforms in all)."""
        if self._small is not None:
            return self
        self._skip(start // 16 * 16)
        other = StreamedRandn.__new__(StreamedRandn)
        other.numel, other.seed, other.full, other._small, other._tail = self.numel, self.seed, self.full, None, self._tail
        other.g = torch.Generator()
        other.g.set_state(self.g.get_state())
        other.pos, other.buf, other.buf_start = self.pos, torch.empty(0), self.pos
        return other

    def read(self, a: int, b: int, out: Tensor | None = None) -> Tensor:
        """Elements [a, b), into ``out`` (b − a elements, contiguous) when given."""
        if not 0 <= a <= b <= self.numel:
            raise IndexError(f"elements [{a}, {b}) of a tensor of {self.numel}")
        out = torch.empty(b - a) if out is None else out.view(-1)
        if self._small is not None:
            return out.copy_(self._small[a:b])
        lo, hi = a // 16 * 16, min(-(-b // 16) * 16, self.full)
        if lo < self.buf_start:
            raise ValueError(f"StreamedRandn reads go front to back: element {a} is behind {self.buf_start}")
        if lo >= self.pos:  # nothing buffered is needed
            self._skip(lo)
            self.buf, self.buf_start = torch.empty(0), self.pos
        else:
            self.buf, self.buf_start = self.buf[lo - self.buf_start :], lo
        if hi > self.pos:
            self.buf = torch.cat([self.buf, torch.randn(hi - self.pos, generator=self.g)])
            self.pos = hi
        n_main = max(0, min(b, self.full) - a)
        out[:n_main] = self.buf[a - self.buf_start : a - self.buf_start + n_main]
        t0 = self.numel - 16
        if self.numel % 16 and b > t0:  # the last 16 elements, redone from 16 further uniforms
            k = max(a, t0)
            out[k - a :] = self._tail_values()[k - t0 : b - t0]
        return out

    def release(self, before: int) -> None:
        """Forget buffered elements before ``before`` (no later read starts earlier)."""
        lo = before // 16 * 16
        if self._small is None and lo > self.buf_start:
            self.buf, self.buf_start = self.buf[lo - self.buf_start :].clone(), min(lo, self.pos)

    def _tail_values(self) -> Tensor:
        if self._tail is None:
            rest = StreamedRandn.__new__(StreamedRandn)
            rest.g = torch.Generator()
            rest.g.set_state(self.g.get_state())
            rest.pos = self.pos
            rest._skip(self.numel)
            self._tail = torch.randn(16, generator=rest.g)
        return self._tail

    @staticmethod
    def generator_after(numel: int, seed: int) -> torch.Generator:
        """The generator as ``torch.randn(numel, …)`` leaves it (for draws that follow the noise)."""
        g = torch.Generator().manual_seed(seed)
        if numel < 16:
            torch.randn(numel, generator=g)
            return g
        r = StreamedRandn(numel, seed)
        r._skip(numel + (16 if numel % 16 else 0))
        return r.g


@torch.no_grad()
def super_resolve_rows(
    policy: SRPolicy,
    lr: Tensor,
    *,
    seed: int = 0,
    sampler: str = "ode",
    steps: int = 20,
    tile: int = 128,
    overlap: int = 16,
    prompt: str | None = None,
    progress: bool = False,
) -> Iterator[Tensor]:
    """SR one image ``lr`` [3,h,w] in [0,1], yielding the output [3,s·h,s·w] as bands of rows from
    top to bottom ([3,k,s·w] each, not clamped, no colour fix) — see ``super_resolve``.

    Memory is bounded by one row of tiles: the noise of the band (drawn piece by piece, see
    ``StreamedRandn``) and its blend accumulators; rows are handed out as soon as no later tile
    covers them. ``progress``: a tqdm bar over the tiles.
    """
    s = policy.scale
    channels, factor, multiple = noise_layout(policy)
    q = multiple // math.gcd(multiple, s)  # LR pixels per alignment unit
    _, h0, w0 = lr.shape
    lr = _pad_to(lr, q)
    _, h, w = lr.shape
    hn, wn = h * s // factor, w * s // factor  # the noise plane: randn((1, channels, hn, wn), seed)
    first = StreamedRandn(channels * hn * wn, seed)
    streams = [first.fork(c * hn * wn) for c in range(channels)]
    extra = {"generator": StreamedRandn.generator_after(channels * hn * wn, seed)} if sampler in STOCHASTIC_SAMPLERS else {}
    prompts = None if prompt is None else [prompt]

    def run(lr_tile: Tensor, nz: Tensor) -> Tensor:
        cond = condition_with_prompts(policy, lr_tile[None], prompts)
        return policy.sample(cond, policy_noise(policy, nz), sampler=sampler, steps=steps, **extra).images[0].cpu()

    def band_noise(y: int, th: int, y_next: int) -> Tensor:
        a, b = y * s // factor, (y + th) * s // factor
        nz = torch.empty(1, channels, b - a, wn)
        for c, st in enumerate(streams):
            st.read(c * hn * wn + a * wn, c * hn * wn + b * wn, out=nz[0, c])
            st.release(c * hn * wn + y_next * s // factor * wn)  # keep only what the next band re-reads
        return nz

    if tile > 0:
        tile = max(q, tile // q * q)
    if tile <= 0 or (h <= tile and w <= tile):
        yield run(lr, band_noise(0, h, h))[:, : h0 * s, : w0 * s]
        return
    overlap = max(0, min(overlap, tile // 2)) // q * q
    ys, xs = _starts(h, tile, tile - overlap), _starts(w, tile, tile - overlap)
    th, tw = min(tile, h), min(tile, w)
    wx = {x: _ramp(tw * s, overlap * s, x == 0, x + tw >= w) for x in xs}
    acc = torch.zeros(3, 0, w * s)  # output rows [y·s, …) of the band in hand
    wsum = torch.zeros(1, 0, w * s)
    bar = tqdm(total=len(ys) * len(xs), desc="tiles", unit="tile", disable=not progress, leave=False)
    try:
        for r, y in enumerate(ys):
            carry = acc.shape[1]  # rows already holding earlier tiles' shares
            acc = torch.cat([acc, torch.zeros(3, th * s - carry, w * s)], 1)
            wsum = torch.cat([wsum, torch.zeros(1, th * s - carry, w * s)], 1)
            y_next = ys[r + 1] if r + 1 < len(ys) else h
            nz = band_noise(y, th, y_next)
            wy = _ramp(th * s, overlap * s, y == 0, y + th >= h)
            for x in xs:
                img = run(lr[:, y : y + th, x : x + tw], nz[..., x * s // factor : (x + tw) * s // factor])
                wt = (wy[:, None] * wx[x][None, :])[None]
                acc[:, :, x * s : (x + tw) * s] += img * wt
                wsum[:, :, x * s : (x + tw) * s] += wt
                bar.update(1)
            del nz
            done = (y_next - y) * s  # rows no later tile touches
            keep = max(0, min(done, h0 * s - y * s))
            rest, wrest = acc[:, done:].clone(), wsum[:, done:].clone()
            if keep:
                yield acc[:, :keep].div_(wsum[:, :keep])[:, :, : w0 * s]  # final rows, normalised in place
            acc, wsum = rest, wrest
    finally:
        bar.close()


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
    progress: bool = False,
) -> Tensor:
    """SR one image ``lr`` [3,h,w] in [0,1] -> [3,s·h,s·w] in [0,1].

    The noise of the whole output is ``torch.randn((1, C, H/f, W/f))`` from ``seed`` in the
    policy's own space (pixels, or VAE latents laid out spatially, see ``noise_layout``) — drawn
    piece by piece as the tiles need it, never whole. Images larger than ``tile`` LR pixels are
    processed in tiles overlapping by ``overlap`` LR pixels, each tile taking its crop of that
    noise, and blended linearly in pixel space: a pixel's noise depends only on its position, so
    the result does not depend on the tiling beyond the seams (and a latent backend never holds
    more than one tile's latents). Sizes a latent backend cannot take (output not a multiple of
    its VAE factor) are padded by reflection and cropped back. ``prompt``: text for
    text-conditioned policies. This returns the whole image; ``super_resolve_rows`` hands it out
    in bands (what ``sralign sr`` writes, so its memory is bounded by a row of tiles).
    """
    bands = super_resolve_rows(policy, lr, seed=seed, sampler=sampler, steps=steps, tile=tile, overlap=overlap,
                               prompt=prompt, progress=progress)
    out = torch.cat(list(bands), 1)
    if colorfix != "none":
        s = policy.scale
        up = torch.nn.functional.interpolate(lr[None], scale_factor=s, mode="bicubic", align_corners=False).clamp(0, 1)
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
