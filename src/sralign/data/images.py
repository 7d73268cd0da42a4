"""Reading and writing images, and the bundled sample photographs.

Every image comes back as a float tensor [3,H,W] in [0,1]: grayscale is repeated to RGB,
alpha is dropped (RGBA, LA, palette with transparency), 16-bit and 32-bit integer images are
scaled by their own range.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .atomic import atomic_write

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MIN_SIZE = 8


class ImageError(ValueError):
    """An input that is not a usable image; the message names the file and the fix."""


def load_image(path: str | os.PathLike, min_size: int = MIN_SIZE) -> Tensor:
    """Read an image file as [3,H,W] float32 in [0,1]."""
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file or folder")
    if p.is_dir():
        raise ImageError(f"{p}: is a folder, expected an image file")
    try:
        with Image.open(p) as im:
            im.load()
            arr = _to_float_rgb(im)
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image Pillow can read (corrupt, or not png/jpg/webp/bmp/tiff)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{p}: unreadable image ({e}); re-export it as PNG") from None
    h, w = arr.shape[:2]
    if min(h, w) < min_size:
        raise ImageError(f"{p}: image is {w}x{h} px; sralign needs at least {min_size}x{min_size} px")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _to_float_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode == "I":
        a = np.asarray(im, dtype=np.int64).astype(np.float32)
        a = a / 65535.0 if a.max() > 255 else a / 255.0
    elif mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = a / 255.0 if a.max() > 1.0 else a
    elif mode == "1":
        a = np.asarray(im, dtype=np.float32)
    else:
        if mode not in ("RGB", "RGBA", "L", "LA"):
            im = im.convert("RGB")
        a = np.asarray(im, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[2] == 2:  # LA
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif a.shape[2] >= 4:  # RGBA: drop alpha
        a = a[:, :, :3]
    return np.clip(a, 0.0, 1.0).astype(np.float32)


def to_uint8(img: Tensor) -> np.ndarray:
    """[3,H,W] in [0,1] -> HxWx3 uint8 (rounded)."""
    return (img.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def save_image(img: Tensor, path: str | os.PathLike) -> None:
    """Write [3,H,W] in [0,1] atomically (temp file + rename): never leaves a partial file; the
    file mode is the usual one (0666 minus the umask)."""
    p = Path(path)
    arr = to_uint8(img)
    atomic_write(p, lambda tmp: Image.fromarray(arr).save(tmp, format=_format_for(p)), suffix=p.suffix or ".png")


def _format_for(p: Path) -> str:
    ext = p.suffix.lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}.get(ext, "PNG")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Files in ``folder`` (sorted, non-recursive) with an image extension."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------- bundled photographs
# Real photographs shipped inside scikit-image and scikit-learn (no download). The split is fixed.
_SKIMAGE_TRAIN = ("astronaut", "coffee", "motorcycle_left", "hubble_deep_field", "ihc", "camera", "brick", "grass", "moon", "coins")
_SKIMAGE_HELDOUT = ("chelsea", "rocket", "gravel")
_SKLEARN_TRAIN = ("china",)
_SKLEARN_HELDOUT = ("flower",)


@dataclass(frozen=True)
class BundledImage:
    name: str
    path: Path


def bundled_images(split: str = "train") -> list[BundledImage]:
    """The bundled photographs of one split: ``train`` (11) or ``heldout`` (4)."""
    import skimage
    import sklearn

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    sk_dir = Path(skimage.__file__).parent / "data"
    sl_dir = Path(sklearn.__file__).parent / "datasets" / "images"
    names_sk = _SKIMAGE_TRAIN if split == "train" else _SKIMAGE_HELDOUT
    names_sl = _SKLEARN_TRAIN if split == "train" else _SKLEARN_HELDOUT
    out = []
    for n in names_sk:
        hits = [p for p in sk_dir.glob(n + ".*") if p.suffix.lower() in IMAGE_EXTENSIONS]
        if hits:
            out.append(BundledImage(n, hits[0]))
        else:
            log.warning("bundled image %s not found in %s (scikit-image version?)", n, sk_dir)
    for n in names_sl:
        p = sl_dir / f"{n}.jpg"
        if p.is_file():
            out.append(BundledImage(n, p))
        else:
            log.warning("bundled image %s not found in %s", n, sl_dir)
    if not out:
        raise FileNotFoundError("no bundled photographs found: is scikit-image installed?")
    return out


def load_bundled(split: str = "train") -> list[tuple[str, Tensor]]:
    return [(b.name, load_image(b.path)) for b in bundled_images(split)]


def random_crops(images: list[Tensor], n: int, size: int, generator: torch.Generator) -> Tensor:
    """``n`` random ``size``×``size`` crops [n,3,size,size] from a list of [3,H,W] images."""
    return random_crops_with_source(images, n, size, generator)[0]


def random_crops_with_source(images: list[Tensor], n: int, size: int, generator: torch.Generator) -> tuple[Tensor, list[int]]:
    """``random_crops`` and, for each crop, the index of the image it came from."""
    out = torch.empty(n, 3, size, size)
    source = []
    for k in range(n):
        source.append(int(torch.randint(len(images), (1,), generator=generator)))
        img = images[source[-1]]
        _, h, w = img.shape
        y = int(torch.randint(h - size + 1, (1,), generator=generator))
        x = int(torch.randint(w - size + 1, (1,), generator=generator))
        crop = img[:, y : y + size, x : x + size]
        if torch.rand(1, generator=generator) < 0.5:
            crop = crop.flip(-1)
        out[k] = crop
    return out, source


def sidecar_prompt(image_path: str | os.PathLike) -> str | None:
    """The caption in ``IMG.txt`` beside ``IMG.png`` (stripped), or None."""
    p = Path(image_path).with_suffix(".txt")
    return p.read_text(encoding="utf-8").strip() if p.is_file() else None


def center_crop(img: Tensor, size: int) -> Tensor:
    _, h, w = img.shape
    y, x = (h - size) // 2, (w - size) // 2
    return img[:, y : y + size, x : x + size]


# ---------------------------------------------------------------------- datasets
class ImageFolder:
    """The readable images of a folder (non-recursive, sorted), as [3,H,W] tensors in [0,1].

    Files that are not readable images (corrupt, text, too small) are reported by name with a
    warning and skipped; ``skipped`` lists them with the reason.
    """

    def __init__(self, folder: str | os.PathLike, min_size: int = MIN_SIZE, preload: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ImageError(f"{self.folder}: not a folder")
        self.paths: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        self._cache: dict[int, Tensor] = {}
        files = sorted(q for q in self.folder.iterdir() if q.is_file() and not q.name.startswith("."))
        stems = {q.stem for q in files if q.suffix.lower() != ".txt"}
        for p in files:
            if p.suffix.lower() == ".txt" and p.stem in stems:
                continue  # IMG.txt: the caption of IMG.png (see ``sidecar_prompt``)
            try:
                img = load_image(p, min_size=min_size)
            except ImageError as e:
                log.warning("skipping %s", e)
                self.skipped.append((p, str(e)))
                continue
            if preload:
                self._cache[len(self.paths)] = img
            self.paths.append(p)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return self._cache[i] if i in self._cache else load_image(self.paths[i])

    def name(self, i: int) -> str:
        return self.paths[i].stem

    def prompt(self, i: int) -> str | None:
        return sidecar_prompt(self.paths[i])


class PairedPatches:
    """(HR, LR) patch batches made on the fly: random HR crops, degraded by ``degrade``.

    Args:
        images: HR images [3,H,W].
        patch: HR patch size (divisible by ``scale``).
        degrade: callable (hr [B,3,H,W], generator) -> lr [B,3,H/s,W/s].
    """

    def __init__(self, images: list[Tensor], patch: int, scale: int, degrade):
        if patch % scale:
            raise ValueError(f"patch {patch} not divisible by scale {scale}")
        small = [i for i, im in enumerate(images) if min(im.shape[1:]) < patch]
        if small:
            raise ValueError(f"images {small} are smaller than the patch size {patch}")
        self.images, self.patch, self.scale, self.degrade = images, patch, scale, degrade

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        hr = random_crops(self.images, n, self.patch, generator)
        return hr, self.degrade(hr, generator)
