"""Peak RSS of `sralign sr` on a large LR image at two tile sizes: memory must follow the tile,
not the image.

    python benchmarks/sr_rss.py                                  # 6000x4000 LR, --tile 128 vs 512
    python benchmarks/sr_rss.py --width 1500 --height 1000       # a smaller image
    python benchmarks/sr_rss.py --code /other/src                # another checkout (PYTHONPATH)
    python benchmarks/sr_rss.py --policy tiny --width 600 --height 400   # the shipped tiny policy

``--policy pointwise`` (default) runs the real `sralign sr` command with the model replaced by a
stand-in whose output is the upsampled LR plus noise, so a 6000x4000 run (a 24000x16000 output)
takes minutes on a CPU: the figure is sralign's own memory (input, noise, blending, writing),
which is what depends on the image size; a real model adds its activations for one tile.
Each run is a fresh process under ``/usr/bin/time -v``; the figure is its maximum resident set.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import sys, torch
import sralign.cli as cli
from sralign.policies.base import Cond, Samples

class Pointwise:
    scale = 4
    model = torch.nn.Identity()
    def condition(self, lr):
        return Cond(lr, torch.nn.functional.interpolate(lr, scale_factor=4, mode="nearest"))
    def sample(self, cond, noise, **_):
        return Samples((cond.lr_up + 0.02 * noise).clamp(0, 1))

if sys.argv[1] == "pointwise":
    cli._policy = lambda *a, **k: Pointwise()
    sys.argv[1] = "tiny"
sys.exit(cli.main(["sr", sys.argv[2], sys.argv[3], "--policy", sys.argv[1], "--tile", sys.argv[4], "--steps", "1", "--quiet"]))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=6000)
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--tiles", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--policy", default="pointwise", choices=["pointwise", "tiny"])
    ap.add_argument("--code", default=None, help="src folder to measure instead of the installed sralign")
    ap.add_argument("--root", default="/tmp/sralign-sr-rss")
    a = ap.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"lr-{a.width}x{a.height}.png"
    if not src.exists():
        yy, xx = np.mgrid[0 : a.height, 0 : a.width].astype(np.float32)
        img = 128 + 60 * np.sin(xx / 37.0)[..., None] * np.cos(yy / 53.0)[..., None] * np.array([1.0, 0.7, 0.4], np.float32)
        img += np.random.default_rng(0).normal(0, 10, img.shape).astype(np.float32)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(src)
    env = dict(os.environ)
    if a.code:
        env["PYTHONPATH"] = a.code
    res = {}
    for tile in a.tiles:
        with tempfile.TemporaryDirectory(dir=root) as d:
            out = Path(d) / "sr.png"
            t = time.time()
            r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", CHILD, a.policy, str(src), str(out), str(tile)],
                               env=env, capture_output=True, text=True)
            wall = time.time() - t
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-3000:])
            Image.MAX_IMAGE_PIXELS = None  # our own output (24000x16000 for a 6000x4000 LR): read its size only
            with Image.open(out) as im:
                size = im.size
        res[tile] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024
        print(f"sr {a.width}x{a.height} -> {size[0]}x{size[1]}  --tile {tile:4d}  ({a.policy}):  peak RSS {res[tile]:8.0f} MB   {wall:6.1f} s", flush=True)
    if len(res) > 1:
        lo, hi = min(res), max(res)
        print(f"ratio --tile {hi} / --tile {lo}: {res[hi] / res[lo]:.2f}x")
    # what the figures are made of (arithmetic): the float32 buffers of one band of tiles — blend
    # accumulator (3 channels) + weight sum (1) + the band's noise (3 channels, pixel space) — over
    # tile·4 output rows of the whole output width, and the LR image decoded (uint8) and as float32
    W = a.width * 4
    lr_mb = a.width * a.height * 3 * (1 + 4) / 2**20
    for tile in a.tiles:
        band = min(tile, a.height) * 4 * W * (3 + 1 + 3) * 4 / 2**20
        print(f"--tile {tile}: one band's float32 buffers {band:.0f} MB (+ the next band's while it is assembled), "
              f"LR image {lr_mb:.0f} MB; the output PNG is streamed (not held)")


if __name__ == "__main__":
    main()
