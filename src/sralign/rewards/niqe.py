"""A NIQE-style no-reference metric with a pristine model fitted by sralign on the bundled
photographs. **Not the official NIQE**: the official pristine parameters (fitted by Mittal et
al. on 125 images) are not redistributable here, so ``niqe_s`` uses the same features
(MSCN + AGGD fits of pair products, two scales) on 32×32 patches and a multivariate Gaussian
fitted to the sharpest patches of sralign's bundled *training* photographs
(``fit_pristine_model``; parameters shipped in ``assets/niqe_pristine.json``). Lower is better.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .nss import aggd_fit, half_scale, mscn, pair_products, rgb_to_gray

PATCH = 32


def _patch_features(m: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """MSCN map [B,1,H,W] -> features [B,n,18] of its non-overlapping p×p patches, and the
    number of patches per image n."""
    b, _, h, w = m.shape
    nh, nw = h // p, w // p
    if nh == 0 or nw == 0:
        raise ValueError(f"image of {w}x{h} px is smaller than one {p}x{p} patch")
    patches = m[..., : nh * p, : nw * p].unfold(2, p, p).unfold(3, p, p)  # B,1,nh,nw,p,p
    patches = patches.reshape(b * nh * nw, 1, p, p)
    feats = []
    for i, c in enumerate(pair_products(patches)):
        a, mean, l, r = aggd_fit(c.flatten(1))
        feats.extend([a, (l + r) / 2] if i == 0 else [a, mean, l, r])
    return torch.stack(feats, 1).reshape(b, nh * nw, 18), nh * nw


def _local_sharpness(gray: Tensor, p: int) -> Tensor:
    """Mean local std (7×7 Gaussian) of each p×p patch: [B,n]."""
    from .nss import _window

    k = _window(gray.dtype, gray.device)
    mu = F.conv2d(gray, k, padding=3)
    sd = torch.sqrt((F.conv2d(gray * gray, k, padding=3) - mu * mu).abs())
    return F.avg_pool2d(sd, p).flatten(1)


def niqe_patch_features(x: Tensor, patch: int = PATCH) -> tuple[Tensor, Tensor]:
    """[B,3,H,W] in [0,1] -> patch features [B,n,36] (two scales) and patch sharpness [B,n]."""
    g = rgb_to_gray(x.double())
    f1, n = _patch_features(mscn(g), patch)
    f2, _ = _patch_features(mscn(half_scale(g)), patch // 2)
    return torch.cat([f1, f2[:, :n]], dim=2), _local_sharpness(g, patch)


def fit_pristine_model(images: list[Tensor], patch: int = PATCH, sharp_fraction: float = 0.75) -> dict:
    """Fit the pristine MVG: features of patches whose sharpness exceeds ``sharp_fraction`` of
    the image's sharpest patch, pooled over ``images`` ([3,H,W] each)."""
    rows = []
    for img in images:
        f, s = niqe_patch_features(img[None], patch)
        keep = s[0] > sharp_fraction * s[0].max()
        rows.append(f[0][keep])
    feats = torch.cat(rows)
    return {"patch": patch, "n_patches": int(feats.shape[0]), "mean": feats.mean(0).tolist(), "cov": torch.cov(feats.T).tolist()}


def _asset() -> Path:
    return Path(str(resources.files("sralign") / "assets" / "niqe_pristine.json"))


@lru_cache(maxsize=1)
def pristine_model() -> tuple[Tensor, Tensor, int]:
    p = _asset()
    if not p.is_file():
        from ..data.images import load_bundled

        model = fit_pristine_model([img for _, img in load_bundled("train")])
        p.write_text(json.dumps(model))
    d = json.loads(p.read_text())
    return torch.tensor(d["mean"], dtype=torch.float64), torch.tensor(d["cov"], dtype=torch.float64), int(d["patch"])


def niqe_s(x: Tensor) -> Tensor:
    """NIQE-style distance to sralign's pristine model, [B,3,H,W] in [0,1] -> [B] (lower better)."""
    mu_p, cov_p, patch = pristine_model()
    f, _ = niqe_patch_features(x, patch)
    out = []
    for i in range(f.shape[0]):
        fi = f[i]
        mu = fi.mean(0)
        cov = torch.cov(fi.T) if fi.shape[0] > 1 else torch.zeros_like(cov_p)
        d = mu_p - mu
        out.append(torch.sqrt((d @ torch.linalg.pinv((cov_p + cov) / 2) @ d).clamp_min(0)))
    return torch.stack(out).to(x.dtype)
