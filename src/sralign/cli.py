"""The ``sralign`` command line (one entry point, subcommands; see README)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("sralign")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- sr
def cmd_sr(args: argparse.Namespace) -> int:
    from .colorfix import COLOR_FIXES
    from .data.images import IMAGE_EXTENSIONS, ImageError, load_image, save_image
    from .inference import super_resolve
    src = Path(args.input)
    if not src.exists():
        raise CLIError(f"{src}: no such file or folder")
    if args.colorfix not in COLOR_FIXES:
        raise CLIError(f"--colorfix must be one of {', '.join(COLOR_FIXES)}")
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
        stems = {p.stem for p in files if p.suffix.lower() != ".txt"}
        # IMG.txt beside IMG.png is that image's prompt, not an input
        files = [p for p in files if not (p.suffix.lower() == ".txt" and p.stem in stems)]
        if not files:
            raise CLIError(f"{src}: folder holds no files")
        out_dir = Path(args.output)
        targets = [(f, out_dir / (f.stem + ".png")) for f in files]
    else:
        out = Path(args.output)
        if out.suffix.lower() in IMAGE_EXTENSIONS:
            targets = [(src, out)]
        else:
            targets = [(src, out / (src.stem + ".png"))]
    policy = _policy(args.policy, args.model_path)
    policy.model.eval()
    if args.start is not None:
        policy.config.ode_start = args.start
    from tqdm.auto import tqdm

    text = getattr(policy, "prompt_encoder", None) is not None
    if args.prompt is not None and not text:
        raise CLIError(f"--prompt needs a text-conditioned policy; {args.policy} has no text encoder "
                       "(a diffusers model folder with tokenizer/ + text_encoder/)")
    failed = 0
    for f, dst in tqdm(targets, desc="sr", disable=len(targets) < 2 or args.quiet):
        try:
            lr = load_image(f)
        except ImageError as e:
            print(f"sralign sr: skipped {e}", file=sys.stderr)
            failed += 1
            continue
        prompt = args.prompt
        sidecar = f.with_suffix(".txt")
        if text and sidecar.is_file():
            prompt = sidecar.read_text(encoding="utf-8").strip()
        sr = super_resolve(policy, lr, seed=args.seed, sampler=args.sampler, steps=args.steps, tile=args.tile,
                           overlap=args.overlap, colorfix=args.colorfix, prompt=prompt)
        save_image(sr, dst)
        if not args.quiet:
            print(f"{f} -> {dst} ({lr.shape[2]}x{lr.shape[1]} -> {sr.shape[2]}x{sr.shape[1]})")
    ok = len(targets) - failed
    if failed:
        print(f"sralign sr: {ok} written, {failed} failed", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- degrade
def cmd_degrade(args: argparse.Namespace) -> int:
    import torch

    from .config import load_config
    from .data.degradation import RealESRGANConfig, RealESRGANDegradation
    from .data.images import ImageError, load_image, save_image

    src = Path(args.input)
    if not src.exists():
        raise CLIError(f"{src}: no such file or folder")
    cfg = load_config(RealESRGANConfig, args.config, [f"scale={args.scale}"])
    deg = RealESRGANDegradation(cfg)
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")) if src.is_dir() else [src]
    out = Path(args.output)
    from tqdm.auto import tqdm

    failed = []
    for i, f in enumerate(tqdm(files, desc="degrade", disable=args.quiet or len(files) < 2)):
        try:
            hr = load_image(f)
        except ImageError as e:
            print(f"sralign degrade: skipped {e}", file=sys.stderr)
            failed.append(f.name)
            continue
        _, h, w = hr.shape
        h2, w2 = h - h % cfg.scale, w - w % cfg.scale  # crop to a multiple of the scale
        if min(h2, w2) < cfg.scale:
            print(f"sralign degrade: skipped {f}: too small for scale {cfg.scale}", file=sys.stderr)
            failed.append(f.name)
            continue
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
        lr = deg(hr[None, :, :h2, :w2], g)[0]
        save_image(lr, (out / (f.stem + ".png")) if src.is_dir() or out.suffix == "" else out)
    if failed:
        print(f"sralign degrade: {len(files) - len(failed)} written, {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- score
def cmd_score(args: argparse.Namespace) -> int:
    import csv

    import torch
    from tqdm.auto import tqdm

    from .data.images import ImageError, load_image
    from .rewards.base import MetricError
    from .rewards.registry import get_metric

    if args.store:
        from .train.candidates import score_store
        from .data.store import CandidateStore

        names = [n.strip() for n in args.metrics.split(",") if n.strip()]
        try:
            n = score_store(CandidateStore(args.store), names, progress=not args.quiet)
        except (MetricError, ValueError) as e:
            raise CLIError(str(e)) from None
        print(f"scored {n} new (candidate, metric) values in {args.store}")
        return 0
    if not args.sr:
        raise CLIError("give a folder of SR images, or --store DIR")
    sr_dir = Path(args.sr)
    if not sr_dir.is_dir():
        raise CLIError(f"{sr_dir}: not a folder of SR images")
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    kw = {"weights_dir": args.weights_dir} if args.weights_dir else {}
    try:
        metrics = [get_metric(n, **kw) if n.lower().startswith("pyiqa:") else get_metric(n) for n in names]
    except (MetricError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if any(m.kind == "FR" for m in metrics) and not args.hr:
        fr = ", ".join(m.name for m in metrics if m.kind == "FR")
        raise CLIError(f"full-reference metrics ({fr}) need --hr HR_DIR")
    hr_dir = Path(args.hr) if args.hr else None
    files = sorted(p for p in sr_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    rows, failed = [], 0
    for f in tqdm(files, desc="score", disable=args.quiet):
        try:
            sr = load_image(f)[None]
            hr = None
            if hr_dir is not None:
                cands = [p for p in hr_dir.glob(f.stem + ".*")]
                if not cands:
                    raise ImageError(f"{f}: no HR image named {f.stem}.* in {hr_dir}")
                hr = load_image(cands[0])[None]
                if hr.shape != sr.shape:
                    raise ImageError(f"{f}: SR is {sr.shape[3]}x{sr.shape[2]} but HR {cands[0].name} is {hr.shape[3]}x{hr.shape[2]}")
            row = {"image": f.name}
            for m in metrics:
                v = float(m(sr, hr if m.kind == "FR" else None)[0])
                if not torch.isfinite(torch.tensor(v)):
                    raise MetricError(f"{f}: metric {m.name} returned {v}")
                row[m.name] = f"{v:.6f}"
            rows.append(row)
        except (ImageError, MetricError) as e:
            print(f"sralign score: skipped {e}", file=sys.stderr)
            failed += 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", *[m.name for m in metrics]])
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out)
    if rows and not args.quiet:
        for m in metrics:
            vals = [float(r[m.name]) for r in rows]
            print(f"{m.name:>14s} ({m.kind}, {'higher' if m.higher_is_better else 'lower'} is better): mean {sum(vals) / len(vals):.4f} over {len(vals)} images")
    print(f"wrote {out} ({len(rows)} rows)")
    if failed:
        print(f"sralign score: {len(rows)} scored, {failed} failed", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- generate / train / eval
def _policy(spec: str, model_path: str | None = None, start: float | None = None):
    from .policies import PolicyLoadError, load_policy

    if model_path:
        if spec not in ("osediff", "naosd", "controlnet-sd", "flux"):
            raise CLIError("--model-path goes with --policy osediff | controlnet-sd | flux")
        spec = f"{spec}:{model_path}"
    try:
        policy = load_policy(spec)
    except PolicyLoadError as e:
        raise CLIError(str(e)) from None
    if start is not None:
        if not hasattr(getattr(policy, "config", None), "ode_start"):
            raise CLIError(f"--start sets the tiny policy's ODE start; {type(policy).__name__} has none")
        if not 0.0 < start <= 1.0:
            raise CLIError(f"--start must be in (0, 1], got {start}")
        policy.config.ode_start = start  # saved with the aligned policy, so eval samples the same way
    return policy


def cmd_generate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.store import CandidateStore
    from .train.candidates import GenerateConfig, generate
    from .train.distributed import barrier, init_if_needed, rank_world

    ov = list(args.overrides)
    for flag, key in (("m", "m"), ("steps", "steps"), ("sampler", "sampler"), ("n_lr", "lr_set.n"), ("seed", "seed")):
        v = getattr(args, flag)
        if v is not None:
            ov.append(f"{key}={v}")
    cfg = load_config(GenerateConfig, args.config, ov)
    rank, _ = rank_world()
    init_if_needed()
    # Rank 0 creates (or repairs) the store before the others open it: repair deletes
    # half-written rows, which must not race with another rank's first writes.
    store = CandidateStore(args.store, repair=True) if rank == 0 else None
    barrier()
    if store is None:
        store = CandidateStore(args.store, repair=False)
    n = generate(store, _policy(args.policy, args.model_path, args.start), cfg, progress=not args.quiet)
    print(f"rank {rank}: {n} new candidates in {args.store}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config

    if args.method in ("dp2o", "dpo"):
        from .data.store import CandidateStore
        from .train.offline import OfflineTrainer
        from .train.offline_config import DP2OConfig

        if not args.store:
            raise CLIError(f"--method {args.method} trains on a candidate store: pass --store DIR (made by `sralign generate` + `sralign score --store`)")
        cfg = load_config(DP2OConfig, args.config, [f"method={args.method}", *args.overrides])
        store = CandidateStore(args.store, repair=False)
        try:
            tr = OfflineTrainer(_policy(args.policy, args.model_path, args.start), store, cfg, args.out)
        except ValueError as e:
            raise CLIError(str(e)) from None
        tr.train(resume=args.resume, progress=not args.quiet)
    elif args.method in ("gdpo", "dgpo", "grpo"):
        from .train.online import OnlineTrainer
        from .train.online_config import METHOD_CONFIGS

        cfg = load_config(METHOD_CONFIGS[args.method], args.config, args.overrides)
        OnlineTrainer(_policy(args.policy, args.model_path, args.start), cfg, args.out).train(resume=args.resume, progress=not args.quiet)
    from .train.distributed import rank_world

    if rank_world()[0] == 0:
        print(f"aligned policy written to {Path(args.out) / 'policy'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.run import EvalConfig, run_eval, run_sampler

    from .config import load_config

    ov = list(args.overrides)
    if args.m is not None:
        ov.append(f"m={args.m}")
    cfg = load_config(EvalConfig, args.config, ov)
    target = Path(args.run)
    pol_dir = target / "policy" if (target / "policy" / "config.json").is_file() else target
    out = Path(args.out) if args.out else target / "eval"
    run_eval({target.name: pol_dir}, cfg, out, progress=not args.quiet, run_dirs={target.name: target},
             samplers={target.name: run_sampler(target)})
    print(f"wrote {out / 'eval.json'} and {out / 'report.html'}")
    return 0


# ----------------------------------------------------------------------------- pretrain
def cmd_pretrain(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    pretrain(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"model written to {Path(args.out) / 'model'}")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sralign", description="Align generative SR models with perceptual preferences.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job on the embedded default (tiny policy, bundled photos)")
    d.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    d.add_argument("--quick", action="store_true", help="a smaller budget (for tests)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sr", help="super-resolve an image or a folder of images")
    s.add_argument("input", help="an image file or a folder")
    s.add_argument("output", help="output PNG (for one input file) or folder")
    s.add_argument("--policy", default="tiny", help="'tiny' (shipped), a checkpoint folder, or osediff / controlnet-sd / flux with --model-path")
    s.add_argument("--model-path", default=None, help="local diffusers model folder")
    s.add_argument("--prompt", default=None, help="text for every image (text-conditioned backends); "
                   "IMG.txt beside IMG.png overrides it for that image")
    s.add_argument("--sampler", default="ode", choices=["ode", "sde", "onestep"])
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--start", type=float, default=None, help="noise level the ode/sde sampler starts from (0-1]; the shipped policy uses 0.5, 1 = from pure noise")
    s.add_argument("--tile", type=int, default=128, help="LR tile size; 0 = no tiling")
    s.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels")
    s.add_argument("--colorfix", default="none", help="none | adain | wavelet")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sr)

    g = sub.add_parser("degrade", help="make LR images with the Real-ESRGAN second-order degradation")
    g.add_argument("input", help="an HR image or a folder")
    g.add_argument("output", help="output folder (or a .png for one input file)")
    g.add_argument("--scale", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--config", default=None, help="YAML with RealESRGANConfig fields")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_degrade)

    c = sub.add_parser("score", help="score images with IQA metrics by name -> CSV")
    c.add_argument("sr", nargs="?", help="folder of SR images")
    c.add_argument("--store", default=None, help="score every candidate of a candidate store instead (resumable)")
    c.add_argument("--hr", default=None, help="folder of HR images with the same file stems (FR metrics)")
    c.add_argument("--metrics", default="psnr,ssim,brisque,niqe_s", help="comma-separated names; pyiqa:NAME for pyiqa")
    c.add_argument("--weights-dir", default=None, help="folder holding pyiqa weight files")
    c.add_argument("--out", default="scores.csv")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_score)

    gn = sub.add_parser("generate", help="offline candidates: M seeds per LR into a candidate store (resumable)")
    gn.add_argument("--store", required=True)
    gn.add_argument("--policy", default="tiny", help="tiny | a policy folder | osediff / controlnet-sd / flux with --model-path")
    gn.add_argument("--model-path", default=None, help="local diffusers model folder for --policy osediff|controlnet-sd|flux")
    gn.add_argument("--start", type=float, default=None, help="tiny policy: noise level its ODE starts from (shipped 0.5; 1 = pure noise)")
    gn.add_argument("--m", type=int, default=None, help="candidates per LR (default 16)")
    gn.add_argument("--steps", type=int, default=None)
    gn.add_argument("--sampler", default=None, choices=["ode", "sde", "onestep"])
    gn.add_argument("--n-lr", dest="n_lr", type=int, default=None, help="number of bundled LR crops")
    gn.add_argument("--seed", type=int, default=None)
    gn.add_argument("--config", default=None)
    gn.add_argument("--quiet", action="store_true")
    gn.add_argument("overrides", nargs="*", help="GenerateConfig key=value overrides")
    gn.set_defaults(func=cmd_generate)

    tr = sub.add_parser("train", help="align a policy: dp2o / dpo (offline) or gdpo / dgpo / grpo (online)")
    tr.add_argument("--method", required=True, choices=["dp2o", "dpo", "gdpo", "dgpo", "grpo"])
    tr.add_argument("--store", default=None, help="candidate store (dp2o, dpo)")
    tr.add_argument("--policy", default="tiny", help="tiny | a policy folder | osediff / controlnet-sd / flux with --model-path")
    tr.add_argument("--model-path", default=None, help="local diffusers model folder for --policy osediff|controlnet-sd|flux")
    tr.add_argument("--start", type=float, default=None, help="tiny policy: ODE start noise level, saved with the aligned policy")
    tr.add_argument("--out", required=True)
    tr.add_argument("--config", default=None, help="YAML with the method's config fields")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--quiet", action="store_true")
    tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. beta=2000 steps=300")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="Best@M / Mean@M / Worst@M of an aligned run vs its reference -> JSON, plots, report")
    ev.add_argument("run", help="a training run folder (or a policy folder)")
    ev.add_argument("--out", default=None)
    ev.add_argument("--m", type=int, default=None)
    ev.add_argument("--config", default=None)
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument("overrides", nargs="*")
    ev.set_defaults(func=cmd_eval)

    t = sub.add_parser("pretrain", help="train the tiny base policy (how the shipped checkpoint was made)")
    t.add_argument("--out", default="runs/pretrain")
    t.add_argument("--config", default=None, help="YAML file with PretrainConfig fields")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=500 policy.scale=2")
    t.set_defaults(func=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come anywhere (argparse binds a trailing nargs="*" positional early)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"sralign {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sralign {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # config errors and the like: one line, not a traceback
        from .config import ConfigError

        if isinstance(e, ConfigError):
            print(f"sralign {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
