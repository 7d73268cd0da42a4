"""The stage-2 pretraining photographs of the shipped tiny policy, from Debian packages.

    apt-get download plasma-workspace-wallpapers gnome-backgrounds ukui-wallpapers
    for d in *.deb; do dpkg-deb -x "$d" debs; done
    python docs/pretrain_photos.py debs /tmp/photos

Writes OUT/train (13 images) and OUT/val (2: the selection set for ``ode_start``), each the
package's largest version of the picture, downscaled (Pillow, Lanczos) to an 800 px short side
and saved as PNG. The package folders are only read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

PLASMA = "usr/share/wallpapers"
TRAIN = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "OneStandsOut", "Path",
         "summer_1am", "Elarun", "PastelHills"]
VAL = ["Grey", "Kite"]
OTHER = {"wood": "usr/share/backgrounds/gnome/wood-l.webp", "fluent-color": "usr/share/backgrounds/fluent-color.png"}


def largest(folder: Path) -> Path:
    files = [p for p in (folder / "contents" / "images").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    if not files:
        raise SystemExit(f"{folder}: no wallpaper images; was plasma-workspace-wallpapers extracted here?")
    return max(files, key=lambda p: p.stat().st_size)


def shrink(src: Path, dst: Path, short: int = 800) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        s = short / min(im.size)
        im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS).save(dst)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    for split, names in (("train", TRAIN), ("val", VAL)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for n in names:
            shrink(largest(root / PLASMA / n), out / split / f"plasma-{n}.png")
    for n, rel in OTHER.items():
        src = root / rel
        if not src.is_file():
            raise SystemExit(f"{src}: missing; extract gnome-backgrounds and ukui-wallpapers into {root} too")
        shrink(src, out / "train" / f"{n}.png")
    print(f"{out}/train: {len(TRAIN) + len(OTHER)} images, {out}/val: {len(VAL)} images")


if __name__ == "__main__":
    main()
