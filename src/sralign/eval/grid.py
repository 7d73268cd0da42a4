"""Image grids with labels (PIL only), for docs and reports."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw
from torch import Tensor

from ..data.images import to_uint8


def image_grid(rows: list[list[Tensor]], labels: list[str] | None = None, pad: int = 4, label_h: int = 14, zoom: int = 1) -> Image.Image:
    """Tile [3,H,W] tensors (all the same size) into a grid; ``labels`` name the columns;
    ``zoom`` enlarges every tile (nearest neighbour) so small crops stay readable."""
    if zoom > 1:
        rows = [[x.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2) for x in r] for r in rows]
    h, w = rows[0][0].shape[1:]
    ncol = max(len(r) for r in rows)
    top = label_h if labels else 0
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    if labels:
        for j, lab in enumerate(labels):
            draw.text((pad + j * (w + pad) + 2, 1), lab, fill="black")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            canvas.paste(Image.fromarray(to_uint8(img)), (pad + j * (w + pad), top + pad + i * (h + pad)))
    return canvas


def save_grid(rows: list[list[Tensor]], path: str | Path, labels: list[str] | None = None, zoom: int = 1) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, labels, zoom=zoom).save(p)
    return p
