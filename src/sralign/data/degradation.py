"""Degradations that turn HR patches into LR inputs.

``RealESRGANDegradation``: the second-order "high-order" degradation of Real-ESRGAN (Wang et
al., 2021), re-implemented in torch from the published recipe. Parameter names and defaults
follow BasicSR's ``train_realesrnet_x4plus.yml`` (BasicSR, Apache-2.0, credited for the
recipe); GDPO-SR trains with ``second_phase_prob = 1.0`` and ``final_sinc_prob = 0.8``.
Batched: a batch is degraded in one call (blur and noise per sample, resize scale per batch as
in Real-ESRGAN's ``feed_data``). Seeded: the same ``torch.Generator`` seed gives identical bytes.

``simple_degradation`` (blur + bicubic + mild noise) is the light alternative.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import special
from torch import Tensor

from ..config import ranged

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass
class RealESRGANConfig:
    """Real-ESRGAN degradation parameters (BasicSR names and defaults)."""

    scale: int = ranged(4, ge=1)
    # first degradation
    blur_kernel_size: int = 21
    kernel_range: tuple[int, int] = (7, 21)  # odd sizes, padded to blur_kernel_size
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second degradation
    second_phase_prob: float = 1.0
    second_blur_prob: float = 0.8
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    # final
    final_sinc_prob: float = 0.8

    def cross_check(self) -> str | None:
        for k, v in vars(self).items():
            if isinstance(v, (int, float)) and (k.endswith("_prob") or k.endswith("_prob2")):
                if not 0.0 <= v <= 1.0:
                    return f"{k} must be a probability in [0, 1], got {v}"
            elif isinstance(v, tuple) and len(v) == 2 and k not in ("kernel_list", "kernel_list2") and v[0] > v[1]:
                return f"{k} {list(v)} is not a (low, high) range"
        for k in ("kernel_prob", "kernel_prob2", "resize_prob", "resize_prob2"):
            v = getattr(self, k)
            if any(x < 0 for x in v) or sum(v) <= 0:
                return f"{k} {list(v)} must be non-negative weights with a positive sum"
        for k in ("kernel_list", "kernel_list2"):
            bad = [x for x in getattr(self, k) if x not in KERNEL_TYPES]
            if bad:
                return f"{k} names unknown kernel(s) {bad}; valid: {', '.join(KERNEL_TYPES)}"
        if len(self.kernel_prob) != len(self.kernel_list) or len(self.kernel_prob2) != len(self.kernel_list2):
            return "kernel_prob / kernel_prob2 need one weight per entry of kernel_list / kernel_list2"
        return None


# ----------------------------------------------------------------------------- random helpers
def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _choice(g: torch.Generator, options, probs=None):
    if probs is None:
        return options[int(torch.randint(len(options), (), generator=g))]
    p = torch.tensor(probs, dtype=torch.float64)
    return options[int(torch.multinomial(p / p.sum(), 1, generator=g))]


# ----------------------------------------------------------------------------- kernels
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    return np.meshgrid(ax, ax)


def _inv_cov(sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    d = np.diag([sig_x**2, sig_y**2])
    u = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return np.linalg.inv(u @ d @ u.T)


def _quad(size: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
    xx, yy = _grid(size)
    xy = np.stack([xx, yy], axis=-1)
    return np.einsum("...i,ij,...j->...", xy, _inv_cov(sig_x, sig_y, theta), xy)


def gaussian_kernel2d(size: int, sig_x: float, sig_y: float, theta: float, kind: str = "gaussian", beta: float = 1.0) -> np.ndarray:
    """Bivariate kernel (normalised): ``gaussian`` exp(−q/2), ``generalized`` exp(−½·q^β),
    ``plateau`` 1/(1+q^β), with q = xᵀΣ⁻¹x."""
    q = _quad(size, sig_x, sig_y, theta)
    if kind == "gaussian":
        k = np.exp(-0.5 * q)
    elif kind == "generalized":
        k = np.exp(-0.5 * np.power(q, beta))
    elif kind == "plateau":
        k = 1.0 / (np.power(q, beta) + 1.0)
    else:
        raise ValueError(kind)
    return k / k.sum()


def sinc_kernel2d(size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc) kernel with cutoff ω_c (radians), via the Bessel J1."""
    xx, yy = _grid(size)
    r = np.sqrt(xx**2 + yy**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    k[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    return k / k.sum()


def _pad_kernel(k: np.ndarray, size: int) -> np.ndarray:
    p = (size - k.shape[0]) // 2
    return np.pad(k, ((p, p), (p, p))) if p > 0 else k


def random_blur_kernel(g: torch.Generator, cfg: RealESRGANConfig, second: bool = False) -> np.ndarray:
    """One blur kernel [blur_kernel_size]² as Real-ESRGAN's dataset samples it."""
    ks = int(_choice(g, list(range(cfg.kernel_range[0], cfg.kernel_range[1] + 1, 2))))
    sinc_p = cfg.sinc_prob2 if second else cfg.sinc_prob
    if float(torch.rand((), generator=g)) < sinc_p:
        cutoff = _u(g, math.pi / 3, math.pi) if ks < 13 else _u(g, math.pi / 5, math.pi)
        return _pad_kernel(sinc_kernel2d(ks, cutoff), cfg.blur_kernel_size)
    kinds, probs = (cfg.kernel_list2, cfg.kernel_prob2) if second else (cfg.kernel_list, cfg.kernel_prob)
    sig = cfg.blur_sigma2 if second else cfg.blur_sigma
    bg = cfg.betag_range2 if second else cfg.betag_range
    bp = cfg.betap_range2 if second else cfg.betap_range
    kind = _choice(g, list(kinds), list(probs))
    sx = _u(g, *sig)
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sy = sx if iso else _u(g, *sig)
    theta = 0.0 if iso else _u(g, -math.pi, math.pi)
    if kind.startswith("generalized"):
        beta = _u(g, bg[0], 1.0) if float(torch.rand((), generator=g)) < 0.5 else _u(g, 1.0, bg[1])
        k = gaussian_kernel2d(ks, sx, sy, theta, "generalized", beta)
    elif kind.startswith("plateau"):
        beta = _u(g, bp[0], 1.0) if float(torch.rand((), generator=g)) < 0.5 else _u(g, 1.0, bp[1])
        k = gaussian_kernel2d(ks, sx, sy, theta, "plateau", beta)
    else:
        k = gaussian_kernel2d(ks, sx, sy, theta, "gaussian")
    return _pad_kernel(k, cfg.blur_kernel_size)


def filter2d(x: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample filtering of x [B,C,H,W] with kernels [B,k,k] (odd k; reflect padding)."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    pad = k // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode).reshape(1, b * c, h + 2 * pad, w + 2 * pad)
    weight = kernels.to(x)[:, None].repeat_interleave(c, dim=0)
    return F.conv2d(xp, weight, groups=b * c).reshape(b, c, h, w)


# ----------------------------------------------------------------------------- noise / jpeg
def add_gaussian_noise(x: Tensor, sigma: Tensor, gray: Tensor, g: torch.Generator) -> Tensor:
    """x [B,C,H,W]; sigma [B] on the 0–1 scale; gray [B] bool: one noise map for all channels."""
    b, c, h, w = x.shape
    col = torch.randn(x.shape, generator=g, dtype=x.dtype)
    gr = torch.randn((b, 1, h, w), generator=g, dtype=x.dtype).expand(b, c, h, w)
    n = torch.where(gray[:, None, None, None], gr, col)
    return x + n * sigma[:, None, None, None]


def add_poisson_noise(x: Tensor, scale: Tensor, gray: Tensor, g: torch.Generator) -> Tensor:
    """Poisson (shot) noise as in Real-ESRGAN: quantise to 2^⌈log2(#levels)⌉ levels."""
    x = x.clamp(0, 1)
    out = x.clone()
    for i in range(x.shape[0]):
        img = x[i : i + 1]
        if bool(gray[i]):
            img = (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])
        q = torch.round(img * 255) / 255
        vals = 2 ** math.ceil(math.log2(max(2, len(torch.unique(q)))))
        noisy = torch.poisson(q * vals, generator=g) / vals
        out[i] = x[i] + (noisy - q)[0].expand_as(x[i]) * scale[i]
    return out


def jpeg_roundtrip(x: Tensor, quality: Tensor | list[int]) -> Tensor:
    """A real JPEG encode/decode per sample with Pillow (4:2:0, like cv2/Pillow defaults).
    x [B,3,H,W] in [0,1]; quality [B] ints in 1..100."""
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        arr = (x[i].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality[i]))
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
        out[i] = torch.from_numpy(dec).permute(2, 0, 1)
    return out


def quantize_8bit(x: Tensor) -> Tensor:
    """What saving as an 8-bit image keeps: clamped to [0,1] and rounded to multiples of 1/255."""
    return (x.clamp(0, 1) * 255).round() / 255


def _resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


# ----------------------------------------------------------------------------- the pipeline
class RealESRGANDegradation:
    """Callable ``deg(hr, generator) -> lr``: hr [B,3,H,W] in [0,1] -> [B,3,H/scale,W/scale]."""

    def __init__(self, config: RealESRGANConfig | None = None):
        self.cfg = config or RealESRGANConfig()

    def _noise(self, x: Tensor, g: torch.Generator, second: bool) -> Tensor:
        c = self.cfg
        b = x.shape[0]
        gp = c.gaussian_noise_prob2 if second else c.gaussian_noise_prob
        nr = c.noise_range2 if second else c.noise_range
        pr = c.poisson_scale_range2 if second else c.poisson_scale_range
        grayp = c.gray_noise_prob2 if second else c.gray_noise_prob
        use_gauss = torch.rand(b, generator=g) < gp
        gray = torch.rand(b, generator=g) < grayp
        sigma = (nr[0] + (nr[1] - nr[0]) * torch.rand(b, generator=g)) / 255.0
        pscale = pr[0] + (pr[1] - pr[0]) * torch.rand(b, generator=g)
        out = x.clone()
        if use_gauss.any():
            idx = use_gauss.nonzero().flatten()
            out[idx] = add_gaussian_noise(x[idx], sigma[idx], gray[idx], g)
        if (~use_gauss).any():
            idx = (~use_gauss).nonzero().flatten()
            out[idx] = add_poisson_noise(x[idx], pscale[idx], gray[idx], g)
        return out

    def _jpeg(self, x: Tensor, g: torch.Generator, rng: tuple[float, float]) -> Tensor:
        q = torch.randint(int(rng[0]), int(rng[1]) + 1, (x.shape[0],), generator=g)
        return jpeg_roundtrip(x.clamp(0, 1), q)

    def _random_resize(self, x: Tensor, g: torch.Generator, probs, rng, base: tuple[int, int]) -> Tensor:
        kind = _choice(g, ["up", "down", "keep"], list(probs))
        s = _u(g, 1.0, rng[1]) if kind == "up" else (_u(g, rng[0], 1.0) if kind == "down" else 1.0)
        mode = _choice(g, list(RESIZE_MODES))
        size = (max(1, int(base[0] * s)), max(1, int(base[1] * s)))
        return _resize(x, size, mode)

    def _sinc_kernels(self, b: int, g: torch.Generator) -> Tensor:
        c = self.cfg
        ks = []
        for _ in range(b):
            if float(torch.rand((), generator=g)) < c.final_sinc_prob:
                size = int(_choice(g, list(range(c.kernel_range[0], c.kernel_range[1] + 1, 2))))
                k = _pad_kernel(sinc_kernel2d(size, _u(g, math.pi / 3, math.pi)), c.blur_kernel_size)
            else:
                k = np.zeros((c.blur_kernel_size, c.blur_kernel_size))
                k[c.blur_kernel_size // 2, c.blur_kernel_size // 2] = 1.0  # pulse: no filtering
            ks.append(k)
        return torch.from_numpy(np.stack(ks)).float()

    @torch.no_grad()
    def __call__(self, hr: Tensor, generator: torch.Generator | None = None) -> Tensor:
        c = self.cfg
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        if hr.dim() != 4 or hr.shape[1] != 3:
            raise ValueError(f"hr must be [B,3,H,W], got {tuple(hr.shape)}")
        b, _, h, w = hr.shape
        if h % c.scale or w % c.scale:
            raise ValueError(f"HR size {w}x{h} is not divisible by scale {c.scale}; crop it first")
        hr = hr.float()
        # first order
        k1 = torch.from_numpy(np.stack([random_blur_kernel(g, c) for _ in range(b)])).float()
        x = filter2d(hr, k1)
        x = self._random_resize(x, g, c.resize_prob, c.resize_range, (h, w))
        x = self._noise(x, g, second=False)
        x = self._jpeg(x, g, c.jpeg_range)
        # second order
        if float(torch.rand((), generator=g)) < c.second_phase_prob:
            if float(torch.rand((), generator=g)) < c.second_blur_prob:
                k2 = torch.from_numpy(np.stack([random_blur_kernel(g, c, second=True) for _ in range(b)])).float()
                x = filter2d(x, k2)
            x = self._random_resize(x, g, c.resize_prob2, c.resize_range2, (h // c.scale, w // c.scale))
            x = self._noise(x, g, second=True)
        target = (h // c.scale, w // c.scale)
        sinc = self._sinc_kernels(b, g)
        mode = _choice(g, list(RESIZE_MODES))
        if float(torch.rand((), generator=g)) < 0.5:
            x = filter2d(_resize(x, target, mode), sinc)
            x = self._jpeg(x, g, c.jpeg_range2)
        else:
            x = self._jpeg(x, g, c.jpeg_range2)
            x = filter2d(_resize(x, target, mode), sinc)
        return quantize_8bit(x)


# ----------------------------------------------------------------------------- simple
@dataclass
class SimpleDegradationConfig:
    blur_sigma: tuple[float, float] = (0.2, 1.2)  # Gaussian blur σ (HR pixels), uniform
    noise_sigma: tuple[float, float] = (0.0, 5.0)  # Gaussian noise σ on the 0–255 scale, uniform
    kernel_size: int = ranged(9, ge=1)

    def cross_check(self) -> str | None:
        for k in ("blur_sigma", "noise_sigma"):
            v = getattr(self, k)
            if len(v) != 2 or v[0] > v[1] or v[0] < 0 or (k == "blur_sigma" and v[0] <= 0):
                return f"{k} {list(v)} must be a (low, high) range of {'positive' if k == 'blur_sigma' else 'non-negative'} values"
        return None


def gaussian_kernels(sigmas: Tensor, size: int) -> Tensor:
    """Isotropic Gaussian kernels [B,size,size] (sum 1) for σ [B]."""
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    gk = torch.exp(-(ax[None, :] ** 2) / (2 * sigmas[:, None] ** 2))
    k = gk[:, :, None] * gk[:, None, :]
    return k / k.sum(dim=(1, 2), keepdim=True)


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample blur of x [B,C,H,W] by kernels [B,k,k] (reflect padding), one grouped conv."""
    return filter2d(x, kernels)


def simple_degradation(hr: Tensor, scale: int, generator: torch.Generator, config: SimpleDegradationConfig | None = None) -> Tensor:
    """Blur, bicubic-downscale by ``scale`` and add noise: hr [B,3,H,W] in [0,1] -> [B,3,H/s,W/s]."""
    cfg = config or SimpleDegradationConfig()
    b, _, h, w = hr.shape
    if h % scale or w % scale:
        raise ValueError(f"HR size {w}x{h} is not divisible by scale {scale}")
    lo, hi = cfg.blur_sigma
    sig = lo + (hi - lo) * torch.rand(b, generator=generator)
    x = blur(hr, gaussian_kernels(sig, cfg.kernel_size))
    x = F.interpolate(x, size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)
    lo, hi = cfg.noise_sigma
    ns = (lo + (hi - lo) * torch.rand(b, generator=generator)) / 255.0
    x = x + ns[:, None, None, None] * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)
