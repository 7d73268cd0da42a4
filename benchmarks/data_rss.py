"""Peak RSS of `sralign generate` and of one online training step (DGPO) with ``lr_set.hr_dir``
over folders of few vs many HR images (synthesised 1024² JPEGs), at the same n and patch: the
memory must not grow with the number of HR images.

    python benchmarks/data_rss.py                       # 50 vs 2000 images, n=64, patch 128
    python benchmarks/data_rss.py --counts 50 200       # fewer (the old code holds every HR image)
    python benchmarks/data_rss.py --code /other/src     # measure another checkout (PYTHONPATH)

Every command runs in its own process under ``/usr/bin/time -v``; the figure is its maximum
resident set size. The images are made once under ``--root`` and reused.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def synthesise(root: Path, count: int, side: int) -> Path:
    """``count`` different side² photographs-like JPEGs (smooth colour fields plus texture)."""
    pool = root / f"pool-{side}"
    pool.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    base = np.random.default_rng(0)
    fields = [np.sin(2 * np.pi * (base.uniform(1, 12) * yy + base.uniform(1, 12) * xx)) for _ in range(8)]
    texture = base.normal(0, 0.15, (side, side)).astype(np.float32)
    for i in range(count):
        p = pool / f"img{i:05d}.jpg"
        if p.exists():
            continue
        rng = np.random.default_rng(i + 1)
        a = np.roll(texture, (int(rng.integers(side)), int(rng.integers(side))), (0, 1))[..., None].repeat(3, 2)
        for k in rng.choice(len(fields), 3, replace=False):
            a += fields[k][..., None] * rng.uniform(0.1, 0.5, 3).astype(np.float32)
        img = np.clip((a + 1.6) * 80, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(p, quality=90)
    folder = root / f"hr-{count}-{side}"
    if not folder.exists():
        tmp = Path(tempfile.mkdtemp(dir=root))
        for i in range(count):
            os.link(pool / f"img{i:05d}.jpg", tmp / f"img{i:05d}.jpg")
        tmp.rename(folder)
    return folder


def peak_rss_mb(cmd: list[str], env: dict) -> float:
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[50, 2000])
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--n", type=int, default=64, help="lr_set.n (LR crops)")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--root", default="/tmp/sralign-data-rss")
    ap.add_argument("--code", default=None, help="src folder to measure instead of the installed sralign")
    a = ap.parse_args()
    root = Path(a.root)
    env = dict(os.environ)
    if a.code:
        env["PYTHONPATH"] = a.code
    cli = [sys.executable, "-m", "sralign.cli"]
    common = [f"lr_set.n={a.n}", f"lr_set.patch={a.patch}"]
    rows = []
    for count in a.counts:
        folder = synthesise(root, count, a.side)
        work = Path(tempfile.mkdtemp(dir=root))
        try:
            g = peak_rss_mb([*cli, "generate", "--store", str(work / "store"), "--quiet", "--m", "2", "--steps", "1",
                             f"lr_set.hr_dir={folder}", *common], env)
            t = peak_rss_mb([*cli, "train", "--method", "dgpo", "--out", str(work / "run"), "--quiet", "steps_total=1",
                             "batch_lr=1", "group=2", "steps=1", f"lr_set.hr_dir={folder}", *common], env)
        finally:
            shutil.rmtree(work)
        rows.append((count, g, t))
        print(f"{count:5d} HR images of {a.side}²  n={a.n} patch={a.patch}:  generate {g:7.0f} MB   online step {t:7.0f} MB", flush=True)
    if len(rows) > 1:
        (c0, g0, t0), (c1, g1, t1) = rows[0], rows[-1]
        print(f"ratio {c1} / {c0} images: generate {g1 / g0:.2f}x   online {t1 / t0:.2f}x")


if __name__ == "__main__":
    main()
