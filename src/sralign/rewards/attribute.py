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
from .hybrid import DEFAULT_NR, check_finite, group_minmax, score_group
from .registry import get_metric
from .relative import side_of


TEXTURE_RULES = ("sralign", "authors")
#: The texture side's default metrics: the default hybrid's NR half (HR-relative, optimum at the HR).
DEFAULT_NR_ATTRIBUTE = DEFAULT_NR


def opencv_gray_of_rgb(x: Tensor) -> Tensor:
    """GDPO-SR's gray image, [B,3,H,W] in [0,1] -> [B,1,H,W] in [0,1], multiples of 1/255.

    The authors convert their HR crop to 8 bits by truncation (⌊255·x⌋) and hand the RGB array
    to OpenCV's BGR→gray conversion, which reads channel 0 as blue: red gets blue's weight and
    blue red's. OpenCV's 8-bit conversion is fixed point with 14 fractional bits —
    gray = (1868·c0 + 9617·c1 + 4899·c2 + 2¹³) >> 14 (0.114, 0.587, 0.299, rounded) — and the
    result is divided by 255.
    """
    q = (x.clamp(0, 1) * 255).floor().to(torch.int64)  # numpy's astype(uint8) truncates
    g = (1868 * q[:, 0:1] + 9617 * q[:, 1:2] + 4899 * q[:, 2:3] + (1 << 13)) >> 14
    return g.to(x.dtype) / 255.0


def block_entropy(blocks: Tensor, bins: int = 512, resize: int = 64, drop_out_of_range: bool = False) -> Tensor:
    """Entropy (bits) [N] of the Sobel-magnitude histogram of gray blocks [N,1,h,w] resized
    (bilinear, half-pixel centres) to ``resize``²; ``bins`` bins over [−5.5, 5.5].
    ``drop_out_of_range``: magnitudes above 5.5 are not counted (numpy's histogram) instead of
    falling in the last bin."""
    big = F.interpolate(blocks, size=(resize, resize), mode="bilinear", align_corners=False)
    mag = sobel_magnitude(big).flatten(1)
    lo, hi = -5.5, 5.5
    idx = ((mag - lo) / (hi - lo) * bins).long().clamp(0, bins - 1)
    ones = torch.ones_like(mag)
    if drop_out_of_range:
        ones = ones * (mag <= hi).to(mag.dtype)
    hist = torch.zeros(mag.shape[0], bins, dtype=mag.dtype, device=mag.device).scatter_add_(1, idx, ones)
    p = hist / hist.sum(1, keepdim=True).clamp_min(1e-30)
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(1)


def texture_map(hr: Tensor, patch: int = 10, threshold: float = 0.5, bins: int = 512, resize: int = 64, rule: str = "sralign") -> Tensor:
    """Texture (1) / smooth (0) map [n,1,H,W] of HR images [n,3,H,W] in [0,1].

    As in GDPO-SR's ``create_complexity_matrix``: each ``patch``×``patch`` block of the gray
    image is resized to ``resize``², its Sobel gradient magnitude is histogrammed (``bins``
    bins over [−5.5, 5.5]) and the block's Shannon entropy (bits) decides.

    rule:
        sralign  gray = BT.601 luma (``rgb_to_y``, the Y that PSNR-Y uses); blocks at the right
                 and bottom edges that are smaller than ``patch`` are padded (replicate) to a
                 full block and are texture when entropy > ``threshold`` — every block is read
                 at the same scale. sralign's default: the luma weights sit on the right
                 channels (the authors' swap R and B), and padding keeps edge blocks from being
                 stretched 6× or more before the Sobel filter.
        authors  gray = ``opencv_gray_of_rgb`` (R and B weights swapped, 8-bit); each edge
                 block is resized at its own size and is texture when entropy·h·w >
                 ``threshold``·patch² (the authors' complexity entropy·h·w > 50), so a 10×4
                 block needs entropy > 1.25; histogram values above 5.5 are dropped, as
                 numpy's histogram does. The full blocks agree between the rules up to the gray.
    """
    if rule not in TEXTURE_RULES:
        raise ValueError(f"texture rule must be one of {', '.join(TEXTURE_RULES)}, got {rule!r}")
    n, _, h, w = hr.shape
    if rule == "sralign":
        gray = rgb_to_y(hr.float())
        ph, pw = math.ceil(h / patch), math.ceil(w / patch)
        padded = F.pad(gray, (0, pw * patch - w, 0, ph * patch - h), mode="replicate")
        blocks = padded.unfold(2, patch, patch).unfold(3, patch, patch).reshape(n * ph * pw, 1, patch, patch)
        ent = block_entropy(blocks, bins, resize)
        tex = (ent > threshold).to(gray.dtype).reshape(n, 1, ph, pw)
        return F.interpolate(tex, scale_factor=patch, mode="nearest")[..., :h, :w]
    gray = opencv_gray_of_rgb(hr.double())
    out = torch.zeros(n, 1, h, w, dtype=torch.float32, device=hr.device)
    rows, cols = h // patch, w // patch
    # full blocks, then the right column, the bottom row and the corner at their own sizes
    spans_y = [(i * patch, patch) for i in range(rows)] + ([(rows * patch, h - rows * patch)] if h % patch else [])
    spans_x = [(j * patch, patch) for j in range(cols)] + ([(cols * patch, w - cols * patch)] if w % patch else [])
    by_size: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for y0, bh in spans_y:
        for x0, bw in spans_x:
            by_size.setdefault((bh, bw), []).append((y0, x0))
    for (bh, bw), origins in by_size.items():
        blocks = torch.cat([gray[:, :, y0 : y0 + bh, x0 : x0 + bw] for y0, x0 in origins])  # [len·n,1,bh,bw]
        ent = block_entropy(blocks, bins, resize, drop_out_of_range=True).reshape(len(origins), n)
        tex = (ent * bh * bw > threshold * patch * patch).float()
        for k, (y0, x0) in enumerate(origins):
            out[:, :, y0 : y0 + bh, x0 : x0 + bw] = tex[k].view(n, 1, 1, 1)
    return out


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
    Reference code: NR = MANIQA, MUSIQ (pyiqa, raw scores). sralign's default
    (``DEFAULT_NR_ATTRIBUTE``, the default hybrid's NR half): ``gap:brisque``, ``gap:niqe_s`` —
    each read against the HR's own score, −|NR(SR) − NR(HR)|, so both sides of the reward are at
    their best when SR = HR and its optimum is the truth (a raw BRISQUE / NIQE pays for grain).

    The texture side takes any perceptual-side metric: raw no-reference ones are called on the SR
    alone, HR-relative ones (``gap:NAME``, ``gap:pyiqa:NAME``: ``kind`` "FR", ``side`` "NR") get
    the group's HR as well.

    ``per_region=True``: fidelity is PSNR-Y on smooth pixels only, and each NR metric scores the
    SR with its smooth pixels replaced by the HR's (so only texture pixels can move it; a gap:
    metric compares that composite with the HR).
    """

    nr: list[Metric] = field(default_factory=list)
    per_region: bool = False
    patch: int = 10
    threshold: float = 0.5
    rule: str = "sralign"  # texture_map's rule: "sralign" or "authors" (gray conversion, edge blocks)

    @classmethod
    def from_names(cls, nr: list[str], **kw) -> "AttributeReward":
        """The reward with texture-side metrics ``nr`` (registry names: ``brisque``,
        ``gap:niqe_s``, ``pyiqa:musiq``, …); full-reference metrics are refused."""
        ms = [get_metric(n) for n in nr]
        for m in ms:
            if side_of(m) != "NR":
                raise MetricError(f"{m.name} is full-reference; the attribute reward's texture side takes no-reference "
                                  f"metrics (raw, or read against the HR: gap:NAME)")
        return cls(ms, **kw)

    @property
    def names(self) -> list[str]:
        return ["psnr", *[m.name for m in self.nr]]

    def __call__(self, sr: Tensor, hr: Tensor) -> RewardOut:
        """sr [n,G,3,H,W], hr [n,3,H,W] in [0,1] -> ``RewardOut`` with total [n,G] in [0,1]."""
        if hr is None:
            raise MetricError("the attribute-aware reward needs the HR image (texture map and PSNR)")
        n, g = sr.shape[:2]
        tex = texture_map(hr, self.patch, self.threshold, rule=self.rule).to(sr.dtype)  # [n,1,H,W]
        f_tex = tex.flatten(1).mean(1)[:, None]  # [n,1]
        f_smooth = 1 - f_tex
        flat = sr.reshape(n * g, *sr.shape[2:])
        hr_rep = hr.repeat_interleave(g, 0)
        tex_rep = tex.repeat_interleave(g, 0)
        # score_group hands the HR to the metrics that need it (gap:NAME) and not to raw NR ones
        if self.per_region:
            fid = masked_psnr_y(flat, hr_rep, 1 - tex_rep).reshape(n, g)
            composite = (flat * tex_rep + hr_rep * (1 - tex_rep)).reshape_as(sr)
            raw = score_group(self.nr, composite, hr)
        else:
            fid = psnr_y(flat, hr_rep).reshape(n, g)
            raw = score_group(self.nr, sr, hr)
        raw = {"psnr": check_finite("psnr", fid), **raw}
        return self.from_scores(raw, f_smooth, f_tex)

    @property
    def metrics(self) -> list[Metric]:
        """The metrics whose raw scores make the reward: PSNR-Y (the registry's ``psnr``) and the
        texture side's."""
        return [get_metric("psnr"), *self.nr]

    def areas(self, hr: Tensor) -> tuple[Tensor, Tensor]:
        """(f_smooth, f_texture) [n,1] of hr [n,3,H,W]: the HR's smooth / textured area shares."""
        f_tex = texture_map(hr, self.patch, self.threshold, rule=self.rule).flatten(1).mean(1)[:, None]
        return 1 - f_tex, f_tex

    def ranks(self, raw: dict[str, Tensor], hr: Tensor) -> RewardOut:
        """The reward from raw scores {``psnr`` and each NR name: [n,K]} of K samples per HR
        (e.g. several policies' samples pooled, scored with ``metrics``) and hr [n,3,H,W]."""
        if self.per_region:
            raise MetricError("ranks() reads whole-image scores; per_region=True scores composites (call the reward instead)")
        return self.from_scores(raw, *self.areas(hr))

    def from_scores(self, raw: dict[str, Tensor], f_smooth: Tensor, f_tex: Tensor) -> RewardOut:
        norm = {"psnr": group_minmax(raw["psnr"], True)}
        for m in self.nr:
            norm[m.name] = group_minmax(raw[m.name], m.higher_is_better)
        nr_mean = torch.stack([norm[m.name] for m in self.nr]).mean(0) if self.nr else torch.zeros_like(norm["psnr"])
        total = f_smooth * norm["psnr"] + f_tex * nr_mean
        return RewardOut(total=total, per_metric=raw, normalized=norm)
