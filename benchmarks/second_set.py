"""The demo's aligned policies on photographs nothing was tuned on.

The photographs: the 12 nature photos of Debian's ``mate-backgrounds`` package (GPL-2+, see
its ``/usr/share/doc/mate-backgrounds/copyright``). Get them with the package client, never
from this repository:

    apt-get download mate-backgrounds && dpkg-deb -x mate-backgrounds_*.deb /tmp/mate
    python benchmarks/second_set.py --demo out/demo --photos /tmp/mate/usr/share/backgrounds/mate/nature

(or ``sudo apt install mate-backgrounds`` and ``--photos /usr/share/backgrounds/mate/nature``).

Protocol, fixed before any result was seen: every photo is downscaled (Pillow, antialiased) to
a short side of ``--short-side`` px — the wallpapers are 1280–2560 px JPEGs, whose 128 px crops
at full size are mostly flat and carry JPEG blocks — and saved as PNG in ``--work``; then
``--n`` random ``--patch``² crops are degraded the demo's way (blur + bicubic ×4 + noise), and
every aligned policy of the demo run is compared with its reference under the same sampler and
seeds, on the demo's reward, with held-out PSNR / SSIM, the HR's own no-reference scores,
sharpness and smooth-region noise relative to the HR and the hacking flags
(``sralign.eval``). Prints the same table as the demo and the changes against the reference.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from sralign.data.images import list_images
from sralign.eval.report import format_deltas, format_table
from sralign.demo import DemoConfig
from sralign.eval.run import run_eval, trained_settings
from sralign.train.candidates import LRSetConfig

METHODS = {"dp2o": "ode", "dpo": "ode", "gdpo": "onestep", "dgpo": "ode"}


def prepare(photos: Path, work: Path, short_side: int) -> Path:
    """Downscaled PNG copies of the photos in ``work`` (the photos' folder is only read)."""
    files = list_images(photos)
    if not files:
        raise SystemExit(f"{photos}: no images; see this script's docstring for how to get the photographs")
    work.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = work / f"{f.stem}.png"
        if dst.is_file():
            continue
        with Image.open(f) as im:
            im = im.convert("RGB")
            s = short_side / min(im.size)
            im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS).save(dst)
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="output folder of `sralign demo` (its runs/<method>/policy are evaluated)")
    ap.add_argument("--photos", required=True, help="folder of the second set's photographs")
    ap.add_argument("--work", default="/tmp/sralign-second-set", help="where the downscaled copies and the report go")
    ap.add_argument("--short-side", type=int, default=512)
    ap.add_argument("--n", type=int, default=24, help="random crops")
    ap.add_argument("--patch", type=int, default=64, help="HR crop size (the demo trains and evaluates on 64)")
    ap.add_argument("--m", type=int, default=4, help="seeds per crop")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    hr_dir = prepare(Path(args.photos), Path(args.work) / "hr", args.short_side)
    demo = Path(args.demo)
    pols = {m: demo / "runs" / m / "policy" for m in METHODS if (demo / "runs" / m / "policy" / "config.json").is_file()}
    if not pols:
        raise SystemExit(f"{demo}: no aligned policies under runs/<method>/policy; run `sralign demo --out {demo}` first")
    # the demo's evaluation (its reward, NR share included), on the second set's crops
    cfg = replace(DemoConfig().eval, m=args.m, lr_set=LRSetConfig(split="second", n=args.n, patch=args.patch, seed=7, hr_dir=str(hr_dir)),
                  grid_images=3, grid_seeds=3)
    # each policy is also judged by the reward it trained on (its run's config.yaml)
    trained = trained_settings({k: demo / "runs" / k for k in pols}, cfg)
    res = run_eval(pols, cfg, Path(args.work) / "eval", samplers={k: METHODS[k] for k in pols}, progress=False, trained=trained)
    print(f"{len(list_images(hr_dir))} photographs, {args.n} crops of {args.patch}², M = {args.m}; {time.time() - t0:.0f} s")
    print(format_table(res))
    print()
    print(format_deltas(res))
    print(f"\nreport: {Path(args.work) / 'eval' / 'report.html'}")


if __name__ == "__main__":
    main()
