"""The pretraining photographs of the shipped tiny policy (stages 2 and 3), from Debian packages.

    apt-get download plasma-workspace-wallpapers gnome-backgrounds ukui-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04
    for d in *.deb; do dpkg-deb -x "$d" debs; done
    python docs/pretrain_photos.py debs /tmp/photos

Writes OUT/train (26 images) and OUT/val (4: the selection set for ``ode_start`` and the
pretraining progress figures) for stage 3, and OUT/stage2/train (13) and OUT/stage2/val (2), the
subsets stage 2 used. Each is the package's largest version of the picture, downscaled (Pillow,
Lanczos) to an 800 px short side and saved as PNG. The package folders are only read.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image

PLASMA = "usr/share/wallpapers"
TRAIN = ["BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "OneStandsOut", "Path",
         "summer_1am", "Elarun", "PastelHills"]
VAL = ["Grey", "Kite"]
OTHER = {"wood": "usr/share/backgrounds/gnome/wood-l.webp", "fluent-color": "usr/share/backgrounds/fluent-color.png"}
LOMIRI = "usr/share/backgrounds"  # lomiri-wallpapers-16.04 and -20.04 (CC-BY-4.0 / CC-BY-SA-4.0 photographs)
LOMIRI_TRAIN = ["Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
                "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi", "analogpattern_by_Peter_Nerlich", "free_by_Peter_Nerlich",
                "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "picosdeeuropa_by_Aitzol_Berasategi",
                "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi"]
LOMIRI_VAL = ["life_by_Aitzol_Berasategi", "Kleiber_by_Lukas_Baubkus"]


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
    for n, rel in OTHER.items():
        if not (root / rel).is_file():
            raise SystemExit(f"{root / rel}: missing; extract gnome-backgrounds and ukui-wallpapers into {root} too")
    for n in LOMIRI_TRAIN + LOMIRI_VAL:
        if not (root / LOMIRI / f"{n}.jpg").is_file():
            raise SystemExit(f"{root / LOMIRI / n}.jpg: missing; extract lomiri-wallpapers-16.04 and -20.04 into {root} too")
    stage2 = out / "stage2"
    for split, names in (("train", TRAIN), ("val", VAL)):
        (stage2 / split).mkdir(parents=True, exist_ok=True)
        for n in names:
            shrink(largest(root / PLASMA / n), stage2 / split / f"plasma-{n}.png")
    for n, rel in OTHER.items():
        shrink(root / rel, stage2 / "train" / f"{n}.png")
    for split, names in (("train", LOMIRI_TRAIN), ("val", LOMIRI_VAL)):  # stage 3: stage 2's, copied, + lomiri's
        shutil.copytree(stage2 / split, out / split, dirs_exist_ok=True)
        for n in names:
            shrink(root / LOMIRI / f"{n}.jpg", out / split / f"lomiri-{n}.png")
    print(f"{out}/train: {len(TRAIN) + len(OTHER) + len(LOMIRI_TRAIN)} images, {out}/val: {len(VAL) + len(LOMIRI_VAL)}; "
          f"{out}/stage2/train: {len(TRAIN) + len(OTHER)}, {out}/stage2/val: {len(VAL)}")


if __name__ == "__main__":
    main()
