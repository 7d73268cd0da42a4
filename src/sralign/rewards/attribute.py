"""GDPO-SR's attribute-aware reward: fidelity where the HR is smooth, perceptual quality where
it is textured."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Metric, MetricError, RewardOut
from .functional import psnr_y, rgb_to_y, sobel_magnitude
from .hybrid import check_finite, group_minmax, score_group
from .registry import get_metric


def texture_map(hr: Tensor, patch: int = 10, threshold: float = 0.5, bins: int = 512, resize: int = 64) -> Tensor:
    """Texture (1) / smooth (0) map [n,1,H,W] of HR images [n,3,H,W] in [0,1].

    As in GDPO-SR's ``create_complexity_matrix``: each ``patch``×``patch`` block of the gray
    image is resized to ``resize``² , its Sobel gradient magnitude is histogrammed (``bins``
    bins over [−5.5, 5.5]) and the block is *texture* when the histogram's Shannon entropy
    (bits) exceeds ``threshold`` (the reference code's complexity 50 = entropy 0.5 × 100 px).
    Edge blocks smaller than ``patch`` are measured as they are.
    """
    n, _, h, w = hr.shape
    gray = rgb_to_y(hr.float())
    ph, pw = math.ceil(h / patch), math.ceil(w / patch)
    padded = F.pad(gray, (0, pw * patch - w, 0, ph * patch - h), mode="replicate")
    blocks = padded.unfold(2, patch, patch).unfold(3, patch, patch).reshape(n * ph * pw, 1, patch, patch)
    big = F.interpolate(blocks, size=(resize, resize), mode="bilinear", align_corners=False)
    mag = sobel_magnitude(big).flatten(1)
    lo, hi = -5.5, 5.5
    idx = ((mag - lo) / (hi - lo) * bins).long().clamp(0, bins - 1)
    hist = torch.zeros(mag.shape[0], bins).scatter_add_(1, idx, torch.ones_like(mag))
    p = hist / hist.sum(1, keepdim=True)
    ent = -(p * torch.log2(p.clamp_min(1e-30))).sum(1)
    tex = (ent > threshold).float().reshape(n, 1, ph, pw)
    return F.interpolate(tex, scale_factor=patch, mode="nearest")[..., :h, :w]


def masked_psnr_y(sr: Tensor, hr: Tensor, mask: Tensor, eps: float = 1e-10) -> Tensor:
    """PSNR-Y over the pixels where mask [B,1,H,W] is 1. [B]; empty masks give the full PSNR."""
    d = (rgb_to_y(sr.double()) - rgb_to_y(hr.double())) ** 2
    m = mask.double()
    cnt = m.flatten(1).sum(1)
    mse = torch.where(cnt > 0, (d * m).flatten(1).sum(1) / cnt.clamp_min(1), d.flatten(1).mean(1))
    return (10 * torch.log10(1.0 / (mse + eps))).float()


@dataclass
class AttributeReward:
    """r = f_smooth·norm(PSNR-Y) + f_texture·mean_i norm(NR_i), norm = group min-max.

    f_smooth / f_texture are the smooth / texture area fractions of the HR (``texture_map``).
    Reference code: NR = MANIQA, MUSIQ (pyiqa); built-in default: BRISQUE, NIQE-style.

    ``per_region=True``: fidelity is PSNR-Y on smooth pixels only, and each NR metric scores the
    SR with its smooth pixels replaced by the HR's (so only texture pixels can move it).
    """

    nr: list[Metric] = field(default_factory=list)
    per_region: bool = False
    patch: int = 10
    threshold: float = 0.5

    @classmethod
    def from_names(cls, nr: list[str], **kw) -> "AttributeReward":
        ms = [get_metric(n) for n in nr]
        for m in ms:
            if m.kind != "NR":
                raise MetricError(f"{m.name} is full-reference; the attribute reward's texture side takes NR metrics")
        return cls(ms, **kw)

    @property
    def names(self) -> list[str]:
        return ["psnr", *[m.name for m in self.nr]]

    def __call__(self, sr: Tensor, hr: Tensor) -> RewardOut:
        if hr is None:
            raise MetricError("the attribute-aware reward needs the HR image (texture map and PSNR)")
        n, g = sr.shape[:2]
        tex = texture_map(hr, self.patch, self.threshold)  # [n,1,H,W]
        f_tex = tex.flatten(1).mean(1)[:, None]  # [n,1]
        f_smooth = 1 - f_tex
        flat = sr.reshape(n * g, *sr.shape[2:])
        hr_rep = hr.repeat_interleave(g, 0)
        tex_rep = tex.repeat_interleave(g, 0)
        if self.per_region:
            fid = masked_psnr_y(flat, hr_rep, 1 - tex_rep).reshape(n, g)
            composite = (flat * tex_rep + hr_rep * (1 - tex_rep)).reshape_as(sr)
            raw = score_group(self.nr, composite, None)
        else:
            fid = psnr_y(flat, hr_rep).reshape(n, g)
            raw = score_group(self.nr, sr, None)
        raw = {"psnr": check_finite("psnr", fid), **raw}
        return self.from_scores(raw, f_smooth, f_tex)

    def from_scores(self, raw: dict[str, Tensor], f_smooth: Tensor, f_tex: Tensor) -> RewardOut:
        norm = {"psnr": group_minmax(raw["psnr"], True)}
        for m in self.nr:
            norm[m.name] = group_minmax(raw[m.name], m.higher_is_better)
        nr_mean = torch.stack([norm[m.name] for m in self.nr]).mean(0) if self.nr else torch.zeros_like(norm["psnr"])
        total = f_smooth * norm["psnr"] + f_tex * nr_mean
        return RewardOut(total=total, per_metric=raw, normalized=norm)
