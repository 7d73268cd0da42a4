"""LR training sets streamed from an index of HR files.

An LR set is ``n`` (HR crop, LR) items cut from HR photographs (the bundled ones, or a folder of
yours) and degraded. Nothing holds the HR images: ``LRSet`` keeps an index of files and their
sizes (read from the file headers), plans every crop from a seeded generator, and decodes an HR
file only while cutting the crops that come from it. Items are made in *blocks* that share one
random stream (crop positions, then the degradation of the block's crops as one batch):

- ``block = 0`` (default): the whole set is one block seeded by ``seed`` — the sets sralign has
  always made, byte for byte. Memory grows with ``n`` (the crops), never with the number of HR
  images.
- ``block = B ≥ 1``: block ``b`` (items ``b·B … b·B+B−1``) has its own generator seeded from
  ``(seed, b)``; any item is made on demand from its block alone, so memory is bounded by the
  block and the set can be read in any order, from DataLoader workers too. ``block = 1`` makes
  every item from ``(seed, index)`` alone — the setting for large sets.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ..config import ranged
from .degradation import RealESRGANConfig, RealESRGANDegradation, SimpleDegradationConfig, quantize_8bit, simple_degradation
from .images import MIN_SIZE, ImageError, bundled_images, load_image, sidecar_prompt

log = logging.getLogger(__name__)

DEGRADATIONS = ("simple", "realesrgan")


@dataclass
class LRSetConfig:
    """A deterministic set of (HR, LR) crops: from the bundled photographs of ``split``, or from
    your own HR images in ``hr_dir`` (a folder; ``IMG.txt`` beside ``IMG.png`` is its caption,
    used by text-conditioned policies). ``split`` labels the set in a candidate store.
    ``block``: items made together from one random stream — 0 = the whole set (the default;
    memory grows with ``n``), B ≥ 1 = blocks of B seeded by (seed, block), made on demand
    (1 for large sets: every item from (seed, index) alone). Changing it changes the crops."""

    split: str = ranged("train", nonempty=True)
    n: int = ranged(24, ge=1)
    patch: int = ranged(64, ge=8)  # HR size
    scale: int = ranged(4, ge=1)
    seed: int = ranged(0, ge=0)
    degradation: str = ranged("simple", choices=DEGRADATIONS)
    hr_dir: str = ""
    block: int = ranged(0, ge=0)

    def cross_check(self) -> str | None:
        if self.patch % self.scale:
            return f"patch ({self.patch}) must be a multiple of scale ({self.scale})"
        if not self.hr_dir and self.split not in ("train", "heldout"):
            return f"split {self.split!r} names no bundled set (train | heldout); set hr_dir to use your own HR images"
        if self.hr_dir and not Path(self.hr_dir).expanduser().is_dir():
            return f"hr_dir {self.hr_dir!r} is not a folder"
        return None


class LRItem(NamedTuple):
    lr_id: str
    lr: Tensor  # [3,h,w] in [0,1]
    hr: Tensor  # [3,H,W] in [0,1]
    prompt: str | None  # the source image's caption, if any


@dataclass(frozen=True)
class HRFile:
    """One HR image of the index: its file and size in pixels (from the header, not decoded)."""

    path: Path
    height: int
    width: int


def _header_size(p: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header; ImageError when Pillow cannot read it."""
    try:
        with Image.open(p) as im:
            w, h = im.size
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image Pillow can read (corrupt, or not png/jpg/webp/bmp/tiff)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{p}: unreadable image ({e}); re-export it as PNG") from None
    if min(h, w) < MIN_SIZE:
        raise ImageError(f"{p}: image is {w}x{h} px; sralign needs at least {MIN_SIZE}x{MIN_SIZE} px")
    return h, w


def hr_index(cfg: LRSetConfig) -> list[HRFile]:
    """The HR images an LR set draws from, in a fixed order: the bundled photographs of
    ``cfg.split``, or the readable images of ``cfg.hr_dir`` (sorted; captions, hidden files,
    unreadable files and images smaller than ``cfg.patch`` are skipped with a warning)."""
    if not cfg.hr_dir:
        return [HRFile(b.path, *_header_size(b.path)) for b in bundled_images(cfg.split)]
    folder = Path(cfg.hr_dir).expanduser()
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder (lr_set.hr_dir)")
    files = sorted(q for q in folder.iterdir() if q.is_file() and not q.name.startswith("."))
    stems = {q.stem for q in files if q.suffix.lower() != ".txt"}
    out = []
    for p in files:
        if p.suffix.lower() == ".txt" and p.stem in stems:
            continue  # IMG.txt: the caption of IMG.png
        try:
            h, w = _header_size(p)
        except ImageError as e:
            log.warning("skipping %s", e)
            continue
        if min(h, w) < cfg.patch:
            log.warning("skipping %s: %dx%d px is smaller than lr_set.patch=%d", p, w, h, cfg.patch)
            continue
        out.append(HRFile(p, h, w))
    if not out:
        raise ImageError(f"{cfg.hr_dir}: no readable image of at least {cfg.patch}x{cfg.patch} px "
                         f"(lr_set.patch); add larger HR images or lower lr_set.patch")
    return out


class CropSpec(NamedTuple):
    source: int  # index into the HR index
    y: int
    x: int
    flip: bool  # horizontal flip


def plan_crops(sizes: list[tuple[int, int]], n: int, size: int, generator: torch.Generator) -> list[CropSpec]:
    """``n`` random ``size``² crops of images with ``sizes`` [(H, W)]: the draws of
    ``images.random_crops_with_source`` (source, y, x, flip per crop), made from sizes alone."""
    out = []
    for _ in range(n):
        src = int(torch.randint(len(sizes), (1,), generator=generator))
        h, w = sizes[src]
        y = int(torch.randint(h - size + 1, (1,), generator=generator))
        x = int(torch.randint(w - size + 1, (1,), generator=generator))
        out.append(CropSpec(src, y, x, bool(torch.rand(1, generator=generator) < 0.5)))
    return out


def block_seed(seed: int, block: int) -> int:
    """The generator seed of block ``block`` of a set with ``block ≥ 1``."""
    return int(hashlib.sha256(f"lrset:{seed}:{block}".encode()).hexdigest()[:15], 16)


class LRSet(Dataset):
    """The items of an ``LRSetConfig``, made on demand (see the module docstring).

    ``set[i]`` -> ``LRItem(lr_id, lr [3,patch/scale,patch/scale], hr [3,patch,patch], prompt)``,
    both in [0,1], LR quantised to 8 bits. Iterating makes each block once. Recently made blocks
    are kept (``cache_blocks``). With a DataLoader use ``collate_fn=LRSet.collate``.
    """

    def __init__(self, cfg: LRSetConfig, cache_blocks: int = 2):
        if cfg.degradation not in DEGRADATIONS:
            raise ValueError(f"degradation must be 'simple' or 'realesrgan', got {cfg.degradation!r}")
        if cfg.n < 1:
            raise ValueError(f"lr_set.n must be at least 1, got {cfg.n}")
        if cfg.block < 0:
            raise ValueError(f"lr_set.block must be 0 (whole set) or a block size ≥ 1, got {cfg.block}")
        if cfg.scale < 1 or cfg.patch < cfg.scale or cfg.patch % cfg.scale:
            raise ValueError(f"lr_set.patch={cfg.patch} must be a positive multiple of lr_set.scale={cfg.scale}")
        self.cfg = cfg
        self.files = hr_index(cfg)
        self.block = cfg.block if cfg.block > 0 else cfg.n
        self.cache_blocks = max(1, cache_blocks)
        self._cache: OrderedDict[int, list[LRItem]] = OrderedDict()

    def __len__(self) -> int:
        return self.cfg.n

    def lr_id(self, i: int) -> str:
        return f"{self.cfg.split}{i:04d}"

    @property
    def n_blocks(self) -> int:
        return -(-self.cfg.n // self.block)

    def make_block(self, b: int) -> list[LRItem]:
        """The items of block ``b``, computed from its seed and the files it crops."""
        c = self.cfg
        start, stop = b * self.block, min(c.n, (b + 1) * self.block)
        g = torch.Generator().manual_seed(c.seed if c.block == 0 else block_seed(c.seed, b))
        plan = plan_crops([(f.height, f.width) for f in self.files], stop - start, c.patch, g)
        hr = torch.empty(len(plan), 3, c.patch, c.patch)
        for src in dict.fromkeys(s.source for s in plan):  # decode each HR file once, keep none
            path = self.files[src].path
            img = load_image(path)
            if tuple(img.shape[1:]) != (self.files[src].height, self.files[src].width):
                raise ImageError(f"{path}: changed while the LR set was being made; rerun")
            for k, s in enumerate(plan):
                if s.source == src:
                    crop = img[:, s.y : s.y + c.patch, s.x : s.x + c.patch]
                    hr[k] = crop.flip(-1) if s.flip else crop
            del img
        if c.degradation == "realesrgan":
            lr = RealESRGANDegradation(RealESRGANConfig(scale=c.scale))(hr, g)
        else:
            lr = simple_degradation(hr, c.scale, g, SimpleDegradationConfig())
        lr = quantize_8bit(lr)  # what a PNG round trip keeps
        prompts = {src: sidecar_prompt(self.files[src].path) for src in dict.fromkeys(s.source for s in plan)} if c.hr_dir else {}
        return [LRItem(self.lr_id(start + k), lr[k], hr[k], prompts.get(s.source)) for k, s in enumerate(plan)]

    def _block(self, b: int) -> list[LRItem]:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        items = self.make_block(b)
        self._cache[b] = items
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return items

    def __getitem__(self, i: int) -> LRItem:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of an LR set of {len(self)}")
        i %= len(self)
        return self._block(i // self.block)[i % self.block]

    def __iter__(self) -> Iterator[LRItem]:
        for b in range(self.n_blocks):
            yield from self._block(b)

    def batch(self, idx: list[int]) -> tuple[list[str], Tensor, Tensor, list[str | None]]:
        """Items ``idx`` stacked: (lr_ids, lr [B,3,h,w], hr [B,3,H,W], prompts)."""
        return LRSet.collate([self[i] for i in idx])

    @staticmethod
    def collate(items: list[LRItem]) -> tuple[list[str], Tensor, Tensor, list[str | None]]:
        """DataLoader ``collate_fn``: (lr_ids, lr [B,3,h,w], hr [B,3,H,W], prompts)."""
        return ([it.lr_id for it in items], torch.stack([it.lr for it in items]),
                torch.stack([it.hr for it in items]), [it.prompt for it in items])


def make_lr_set(cfg: LRSetConfig) -> list[LRItem]:
    """Every item of ``cfg`` in a list — same config, same crops and LR bytes. For large sets
    iterate an ``LRSet`` instead (this holds all ``n`` items)."""
    return list(LRSet(cfg))
