"""The ``sralign`` command line (one entry point, subcommands; see README)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("sralign")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- output rules
def _input_files(src: Path) -> list[Path]:
    """The files of folder ``src`` a command reads (sorted, non-recursive, no hidden files);
    ``IMG.txt`` beside ``IMG.png`` is that image's caption, not an input."""
    files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    stems = {p.stem for p in files if p.suffix.lower() != ".txt"}
    return [p for p in files if not (p.suffix.lower() == ".txt" and p.stem in stems)]


def _same_place(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file or folder (after symlinks and hard links), existing or not."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _writable_folder(folder: Path, what: str) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"{what} {folder} is an existing file, not a folder; pass a folder path")
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise CLIError(f"{what} {folder}: {anc} is a file, so no folder can be made there")
    if anc.exists() and not os.access(anc, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {folder}: {anc} is not writable (permission denied); choose a folder you can write to")


def _plan_outputs(pairs: list[tuple[Path, Path]], inputs: list[Path]) -> None:
    """Refuse, before any work, outputs that would overwrite an input (the same file, also via a
    link) or each other (``x.png`` and ``x.jpg`` both -> ``x.png``), naming the files."""
    ids = {}
    for f in inputs:
        try:
            st = f.stat()
            ids[(st.st_dev, st.st_ino)] = f
        except OSError:
            pass
    by_path = {f.resolve(): f for f in inputs}
    seen: dict[Path, Path] = {}
    for f, dst in pairs:
        r = dst.resolve()
        hit = by_path.get(r)
        if hit is None and dst.exists():
            st = dst.stat()
            hit = ids.get((st.st_dev, st.st_ino))
        if hit is not None:
            raise CLIError(f"output {dst} would overwrite the input {hit}; choose another output path")
        if dst.exists() and dst.is_dir():
            raise CLIError(f"output {dst} is an existing folder; choose another output path")
        if r in seen:
            raise CLIError(f"{seen[r]} and {f} would both be written to {dst} (outputs are named STEM.png); "
                           "rename one of them or move it to another folder")
        seen[r] = f


def _image_targets(src: Path, output: str) -> list[tuple[Path, Path]]:
    """(input, output) pairs of ``sr`` / ``degrade``: a folder -> OUT/STEM.png; one file -> OUT
    (an image path) or OUT/STEM.png (a folder). Checked by ``_plan_outputs``."""
    from .data.images import IMAGE_EXTENSIONS

    out = Path(output)
    if src.is_dir():
        if _same_place(src, out):
            raise CLIError(f"output folder {out} is the input folder; write the results to another folder")
        _writable_folder(out, "output folder")
        files = _input_files(src)
        if not files:
            raise CLIError(f"{src}: folder holds no files")
        pairs = [(f, out / (f.stem + ".png")) for f in files]
    else:
        files = [src]
        if out.is_dir() or out.suffix.lower() not in IMAGE_EXTENSIONS:
            if out.suffix and not out.is_dir() and out.exists():
                raise CLIError(f"output {out} is an existing file but not an image path (.png, .jpg, ...); pass an image path or a folder")
            _writable_folder(out, "output folder")
            pairs = [(src, out / (src.stem + ".png"))]
        else:
            _writable_folder(out.parent, "output folder")
            pairs = [(src, out)]
    _plan_outputs(pairs, files)
    return pairs


# ----------------------------------------------------------------------------- sr
def cmd_sr(args: argparse.Namespace) -> int:
    from .colorfix import COLOR_FIXES
    from .data.images import ImageError, load_image, save_image, save_image_rows
    from .inference import super_resolve, super_resolve_rows
    src = Path(args.input)
    if not src.exists():
        raise CLIError(f"{src}: no such file or folder")
    preset = _preset(args)
    settings = _split_policy_overrides(args.overrides, only_policy=True)
    # explicit flags > the preset > the defaults
    for key, default in (("sampler", "ode"), ("steps", 20), ("colorfix", "none")):
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset, key) if preset is not None else default)
    if args.colorfix not in COLOR_FIXES:
        raise CLIError(f"--colorfix must be one of {', '.join(COLOR_FIXES)}")
    if not 1 <= args.steps <= 1000:
        raise CLIError(f"--steps must be in [1, 1000], got {args.steps}")
    if args.tile < 0 or args.overlap < 0:
        raise CLIError(f"--tile and --overlap must be >= 0 (0 = no tiling), got --tile {args.tile} --overlap {args.overlap}")
    targets = _image_targets(src, args.output)
    prompt_source = _prompt_source(args.prompt_source)
    policy = _policy(args.policy, args.model_path, args.start, preset=args.preset, settings=settings,
                     policy_config=args.policy_config, dtype=args.dtype)
    policy.model.eval()
    from tqdm.auto import tqdm

    text = getattr(policy, "prompt_encoder", None) is not None
    if (args.prompt is not None or prompt_source is not None) and not text:
        raise CLIError(f"--prompt / --prompt-source need a text-conditioned policy; {args.policy} has no text encoder "
                       "(a diffusers model folder with tokenizer/ + text_encoder/)")
    if preset is not None and not text:
        log.warning("%s has no text encoder: preset %s's prompts are not used", args.model_path or args.policy, args.preset)
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
        tags = None
        if text and sidecar.is_file():
            prompt = tags = sidecar.read_text(encoding="utf-8").strip()
        elif text and prompt_source is not None:
            tags = _call_prompt_source(prompt_source, lr)
            prompt = tags if args.prompt is None else f"{tags}, {args.prompt}"
        if text and preset is not None:
            prompt = preset.text(tags, args.prompt)  # the paper's prompt template
        kw = dict(seed=args.seed, sampler=args.sampler, steps=args.steps, tile=args.tile, overlap=args.overlap,
                  prompt=prompt, progress=not args.quiet)
        H, W = lr.shape[1] * policy.scale, lr.shape[2] * policy.scale
        if args.colorfix == "none":  # written band by band: memory bounded by a row of tiles
            save_image_rows(super_resolve_rows(policy, lr, **kw), dst, H, W)  # to_uint8 clamps
        else:  # the colour fix needs the whole image
            save_image(super_resolve(policy, lr, colorfix=args.colorfix, **kw), dst)
        if not args.quiet:
            print(f"{f} -> {dst} ({lr.shape[2]}x{lr.shape[1]} -> {W}x{H})")
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
    targets = _image_targets(src, args.output)
    deg = RealESRGANDegradation(cfg)
    files = [f for f, _ in targets]
    from tqdm.auto import tqdm

    failed = []
    for i, (f, dst) in enumerate(tqdm(targets, desc="degrade", disable=args.quiet or len(files) < 2)):
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
        save_image(lr, dst)
    if failed:
        print(f"sralign degrade: {len(files) - len(failed)} written, {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- score
def _open_store(path: str, create: bool = False, repair: bool = True):
    """The candidate store at ``path`` (refused unless it is one, or ``create``), as a CLIError."""
    from .data.store import CandidateStore, StoreError

    try:
        return CandidateStore(path, repair=repair, create=create)
    except StoreError as e:
        raise CLIError(str(e)) from None
    except OSError as e:  # permissions, a full disk
        raise CLIError(f"{e.filename or path}: {e.strerror}") from None


def cmd_score(args: argparse.Namespace) -> int:
    import csv

    import torch
    from tqdm.auto import tqdm

    from .data.atomic import atomic_write
    from .data.images import IMAGE_EXTENSIONS, ImageError, load_image
    from .rewards.base import MetricError
    from .rewards.registry import get_metric

    if args.store:
        from .config import check_metric_names
        from .train.candidates import score_store

        names = [n.strip() for n in args.metrics.split(",") if n.strip()]
        bad = check_metric_names("--metrics", names) if names else "--metrics names no metric; e.g. --metrics psnr,brisque"
        if bad:  # before the store is opened
            raise CLIError(bad)
        store = _open_store(args.store)
        try:
            n = score_store(store, names, progress=not args.quiet)
        except (MetricError, ValueError) as e:
            raise CLIError(str(e)) from None
        print(f"scored {n} new (candidate, metric) values in {args.store}")
        return 0
    if not args.sr:
        raise CLIError("give a folder of SR images, or --store DIR")
    sr_dir = Path(args.sr)
    if not sr_dir.is_dir():
        raise CLIError(f"{sr_dir}: not a folder of SR images")
    hr_dir = Path(args.hr) if args.hr else None
    if hr_dir is not None and not hr_dir.is_dir():
        raise CLIError(f"--hr {hr_dir}: {'not a folder' if hr_dir.exists() else 'no such folder'}; pass the folder of HR images")
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    if not names:
        raise CLIError("--metrics names no metric; e.g. --metrics psnr,ssim,brisque")
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder; pass a .csv file path")
    if _same_place(out.parent, sr_dir):
        raise CLIError(f"--out {out} is inside the SR folder, where it would be read as an SR image next time; write it elsewhere")
    files = sorted(p for p in sr_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    hr_files: dict[str, list[Path]] = {}
    if hr_dir is not None:
        for p in sorted(hr_dir.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
                hr_files.setdefault(p.stem, []).append(p)  # exact stems: no glob on user names
    _plan_outputs([(sr_dir, out)], [*files, *(p for ps in hr_files.values() for p in ps)])
    _writable_folder(out.parent, "--out folder")
    if not files:
        raise CLIError(f"{sr_dir}: folder holds no files")
    kw = {"weights_dir": args.weights_dir} if args.weights_dir else {}
    try:
        metrics = [get_metric(n, **kw) if n.lower().startswith("pyiqa:") else get_metric(n) for n in names]
    except (MetricError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    if any(m.kind == "FR" for m in metrics) and hr_dir is None:
        fr = ", ".join(m.name for m in metrics if m.kind == "FR")
        raise CLIError(f"full-reference metrics ({fr}) need --hr HR_DIR")
    rows, failed = [], 0
    for f in tqdm(files, desc="score", disable=args.quiet):
        try:
            sr = load_image(f)[None]
            hr = None
            if hr_dir is not None:
                cands = hr_files.get(f.stem, [])
                if not cands:
                    raise ImageError(f"{f}: no HR image named {f.stem} (+ an image extension) in {hr_dir}")
                if len(cands) > 1:
                    raise ImageError(f"{f}: {' and '.join(str(c) for c in cands)} both match; keep one HR image per name")
                hr = load_image(cands[0])[None]
                if hr.shape != sr.shape:
                    raise ImageError(f"{f}: SR is {sr.shape[3]}x{sr.shape[2]} px but HR {cands[0]} is {hr.shape[3]}x{hr.shape[2]} px")
            row = {"image": f.name}
            for m in metrics:
                try:
                    v = float(m(sr, hr if m.kind == "FR" else None)[0])
                except MetricError as e:
                    raise MetricError(f"{f}: {e}") from None
                if not torch.isfinite(torch.tensor(v)):
                    raise MetricError(f"{f}: metric {m.name} returned {v}")
                row[m.name] = f"{v:.6f}"
            rows.append(row)
        except (ImageError, MetricError) as e:
            print(f"sralign score: skipped {e}", file=sys.stderr)
            failed += 1

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["image", *[m.name for m in metrics]])
            w.writeheader()
            w.writerows(rows)

    atomic_write(out, write_csv)
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
def _policy(spec: str, model_path: str | None = None, start: float | None = None, *, preset: str | None = None,
            settings: list[str] | None = None, policy_config: str | None = None, dtype: str | None = None):
    """The policy of ``--policy`` / ``--model-path``, with ``--preset``, ``--policy-config``,
    ``policy.KEY=VALUE`` settings (``settings``, prefix removed) and ``--dtype`` applied."""
    from .policies import PolicyLoadError, load_policy

    if model_path and not preset:
        if spec not in ("osediff", "naosd", "controlnet-sd", "flux"):
            raise CLIError("--model-path goes with --policy osediff | controlnet-sd | flux")
    try:
        if preset or settings or policy_config or dtype:
            from .policies.diffusers.presets import load_policy_with_settings

            policy = load_policy_with_settings(spec, model_path, preset=preset, policy_config=policy_config, overrides=settings, dtype=dtype)
        else:
            policy = load_policy(f"{spec}:{model_path}" if model_path else spec)
    except PolicyLoadError as e:
        raise CLIError(str(e)) from None
    if start is not None:
        if not hasattr(getattr(policy, "config", None), "ode_start"):
            raise CLIError(f"--start sets the tiny policy's ODE start; {type(policy).__name__} has none")
        if not 0.0 < start <= 1.0:
            raise CLIError(f"--start must be in (0, 1], got {start}")
        policy.config.ode_start = start  # saved with the aligned policy, so eval samples the same way
    return policy


def _preset(args: argparse.Namespace):
    """The ``--preset`` of these arguments (or None), checked before any work."""
    if not getattr(args, "preset", None):
        return None
    from .policies import PolicyLoadError

    try:
        from .policies.diffusers.presets import get_preset

        return get_preset(args.preset)
    except (PolicyLoadError, ImportError) as e:
        raise CLIError(str(e)) from None


def _split_policy_overrides(overrides: list[str], only_policy: bool = False) -> list[str]:
    """Remove the ``policy.KEY=VALUE`` items from ``overrides`` (in place) and return them as
    ``KEY=VALUE``; with ``only_policy`` any other item is an error."""
    mine = [o for o in overrides if o.startswith("policy.")]
    rest = [o for o in overrides if not o.startswith("policy.")]
    if only_policy and rest:
        raise CLIError(f"unexpected {rest[0]!r}: settings here are policy.KEY=VALUE (e.g. policy.guidance_scale=3.5)")
    overrides[:] = rest
    return [o[len("policy."):] for o in mine]


def _prompt_source(spec: str | None):
    if spec is None:
        return None
    from .prompt_source import PromptSourceError, load_prompt_source

    try:
        return load_prompt_source(spec)
    except PromptSourceError as e:
        raise CLIError(str(e)) from None


def _call_prompt_source(source, lr) -> str:
    from .prompt_source import PromptSourceError

    try:
        return source(lr[None])[0]
    except PromptSourceError as e:
        raise CLIError(str(e)) from None


def cmd_generate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.store import StoreError
    from .train.candidates import GenerateConfig, generate
    from .train.distributed import barrier, init_if_needed, rank_world

    ov = list(args.overrides)
    settings = _split_policy_overrides(ov)
    preset = _preset(args)
    for flag, key in (("m", "m"), ("steps", "steps"), ("sampler", "sampler"), ("n_lr", "lr_set.n"), ("seed", "seed")):
        v = getattr(args, flag)
        if v is not None:
            ov.append(f"{key}={v}")
    base = GenerateConfig(sampler=preset.sampler, steps=preset.steps) if preset is not None else None
    cfg = load_config(GenerateConfig, args.config, ov, base=base)
    rank, _ = rank_world()
    init_if_needed()
    policy = _policy(args.policy, args.model_path, args.start, preset=args.preset, settings=settings, policy_config=args.policy_config,
                     dtype=args.dtype)  # a bad policy fails before a store is created
    # Rank 0 creates (or migrates) the store before the others open it (they refuse a
    # folder without an index).
    store = _open_store(args.store, create=True, repair=True) if rank == 0 else None
    barrier()
    if store is None:
        store = _open_store(args.store, repair=False)
    try:
        n = generate(store, policy, cfg, progress=not args.quiet)
    except StoreError as e:
        raise CLIError(str(e)) from None
    print(f"rank {rank}: {n} new candidates in {args.store}")
    return 0


def _check_method(cfg, method: str) -> None:
    if cfg.method != method:
        raise CLIError(f"--method {method} but the config sets method={cfg.method}; drop one of them")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.checkpoint import check_resume

    _writable_folder(Path(args.out), "--out")
    if args.method in ("dp2o", "dpo"):
        from .train.offline import OfflineTrainer
        from .train.offline_config import DP2OConfig

        if not args.store:
            raise CLIError(f"--method {args.method} trains on a candidate store: pass --store DIR (made by `sralign generate` + `sralign score --store`)")
        cfg = load_config(DP2OConfig, args.config, [f"method={args.method}", *args.overrides])
        _check_method(cfg, args.method)
        if args.resume:
            check_resume(args.out, cfg)
        store = _open_store(args.store, repair=False)
        try:
            tr = OfflineTrainer(_policy(args.policy, args.model_path, args.start), store, cfg, args.out)
        except ValueError as e:
            raise CLIError(str(e)) from None
        tr.train(resume=args.resume, progress=not args.quiet)
    elif args.method in ("gdpo", "dgpo", "grpo"):
        from .train.online import OnlineTrainer
        from .train.online_config import METHOD_CONFIGS

        cfg = load_config(METHOD_CONFIGS[args.method], args.config, args.overrides)
        _check_method(cfg, args.method)
        if args.resume:
            check_resume(args.out, cfg)
        OnlineTrainer(_policy(args.policy, args.model_path, args.start), cfg, args.out).train(resume=args.resume, progress=not args.quiet)
    from .train.distributed import rank_world

    if rank_world()[0] == 0:
        print(f"aligned policy written to {Path(args.out) / 'policy'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.run import REWARD_KEYS, EvalConfig, run_eval, run_reward, run_sampler

    from .config import load_config, read_yaml_mapping

    ov = list(args.overrides)
    settings = _split_policy_overrides(ov)
    preset = _preset(args)
    if args.m is not None:
        ov.append(f"m={args.m}")
    target = Path(args.run)
    if not target.is_dir():
        raise CLIError(f"{target}: {'not a folder' if target.exists() else 'no such folder'}; pass a training run folder (or a policy folder)")
    # rank with the reward the run trained on, unless the user names a reward
    told = {o.split("=", 1)[0].strip() for o in ov} | (set(read_yaml_mapping(args.config)) if args.config else set())
    trained = {} if told & set(REWARD_KEYS) else run_reward(target)
    base = EvalConfig(**({"steps": preset.steps} if preset is not None else {}), **trained)
    cfg = load_config(EvalConfig, args.config, ov, base=base)
    if trained:
        log.info("ranking with the reward %s trained on: %s", target.name,
                 cfg.reward + " " + ", ".join(cfg.nr_metrics if cfg.reward == "attribute" else [*cfg.fr_metrics, *cfg.nr_metrics]))
    if args.out:
        _writable_folder(Path(args.out), "--out")
    pol_dir = target / "policy" if ((target / "policy" / "config.json").is_file() or (target / "policy" / "sralign_policy.json").is_file()) else target
    out = Path(args.out) if args.out else target / "eval"
    pol: object = pol_dir
    if preset is not None or settings or args.policy_config or args.dtype:
        pol = _policy(str(pol_dir), preset=args.preset, settings=settings, policy_config=args.policy_config, dtype=args.dtype)
    sampler = args.sampler or (preset.sampler if preset is not None else None) or run_sampler(target)
    run_eval({target.name: pol}, cfg, out, progress=not args.quiet, run_dirs={target.name: target},
             samplers={target.name: sampler} if sampler else None)
    print(f"wrote {out / 'eval.json'} and {out / 'report.html'}")
    return 0


# ----------------------------------------------------------------------------- pretrain
def cmd_pretrain(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    _writable_folder(Path(args.out), "--out")
    if args.resume:
        from .train.checkpoint import check_resume

        check_resume(args.out, cfg)
    pretrain(cfg, args.out, resume=args.resume, progress=not args.quiet)
    print(f"model written to {Path(args.out) / 'model'}")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_convert(args: argparse.Namespace) -> int:
    try:
        from .policies.diffusers.convert import ConvertError, convert
    except ImportError as e:
        raise CLIError(f"convert needs the diffusers extra: pip install 'sralign[diffusers]' ({e})") from None
    try:
        out = convert(args.kind, args.src, args.base, args.out, num_layers=args.num_layers, num_single_layers=args.num_single_layers,
                      copy=args.copy)
    except ConvertError as e:
        raise CLIError(str(e)) from None
    print(f"{args.kind}: wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _writable_folder(Path(args.out), "--out")
    run_demo(args.out, quick=args.quick, progress=not args.quiet)
    return 0


SAMPLER_CHOICES = ["ode", "sde", "onestep", "ddpm"]  # policies.base.SAMPLERS (not imported: keeps --help light)


def _add_policy_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="a paper's inference settings: c-sd2 | c-flux | osediff | gdpo-sr "
                   "(implies the backend; give the model with --model-path DIR); any value can be overridden")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="diffusers backends: network precision")
    p.add_argument("--policy-config", dest="policy_config", default=None, help="YAML with the backend's settings (guidance_scale: 3.5, …)")


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
    s.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES, help="default: the preset's, else ode")
    s.add_argument("--steps", type=int, default=None, help="default: the preset's, else 20")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--start", type=float, default=None, help="noise level the ode/sde sampler starts from (0-1]; the shipped policy uses 0.5, 1 = from pure noise")
    s.add_argument("--tile", type=int, default=128, help="LR tile size; 0 = no tiling")
    s.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels")
    s.add_argument("--colorfix", default=None, help="none | adain | wavelet (default: the preset's, else none)")
    s.add_argument("--prompt-source", dest="prompt_source", default=None,
                   help="per-image tags: a Python callable MODULE:FUNCTION or FILE.py:FUNCTION (LR [B,3,h,w] in [0,1] -> list of "
                        "strings), or a local transformers image-to-text model folder; IMG.txt beside an image still wins")
    _add_policy_settings(s)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("overrides", nargs="*", help="policy settings policy.KEY=VALUE, e.g. policy.guidance_scale=3.5")
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
    gn.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES)
    gn.add_argument("--n-lr", dest="n_lr", type=int, default=None, help="number of bundled LR crops")
    gn.add_argument("--seed", type=int, default=None)
    gn.add_argument("--config", default=None)
    _add_policy_settings(gn)
    gn.add_argument("--quiet", action="store_true")
    gn.add_argument("overrides", nargs="*", help="GenerateConfig key=value overrides; policy.KEY=VALUE for the policy's settings")
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
    ev.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES, help="default: the preset's, else ode")
    _add_policy_settings(ev)
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument("overrides", nargs="*", help="EvalConfig key=value overrides; policy.KEY=VALUE for the policy's settings")
    ev.set_defaults(func=cmd_eval)

    cv = sub.add_parser("convert", help="a published checkpoint -> a complete local model folder (C-SD2, C-FLUX, OSEDiff, GDPO-SR)")
    cv.add_argument("kind", choices=["sd-controlnet", "flux-controlnet", "osediff", "gdpo-sr"])
    cv.add_argument("src", help="the checkpoint: model.safetensors (ControlNets), osediff.pkl, or the GDPO-SR folder")
    cv.add_argument("--base", required=True, help="the base model's diffusers folder (SD2-base, FLUX.1-dev, SD2.1-base); never modified")
    cv.add_argument("--out", required=True, help="new output folder (refused if it exists and is not empty)")
    cv.add_argument("--num-layers", type=int, default=4, help="flux-controlnet: double-stream blocks (DP²O-SR: 4)")
    cv.add_argument("--num-single-layers", type=int, default=0, help="flux-controlnet: single-stream blocks (DP²O-SR: 0)")
    cv.add_argument("--copy", action="store_true", help="copy the base model's other parts instead of symlinking them")
    cv.set_defaults(func=cmd_convert)

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
    start = getattr(args, "start", None)
    try:
        if start is not None and not 0.0 < start <= 1.0:  # before any model is loaded
            raise CLIError(f"--start must be in (0, 1], got {start}")
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"sralign {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sralign {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user errors (config, checkpoint, files): one line, not a traceback
        msg = _user_error(e, args)
        if msg is None or args.verbose:  # -v shows the traceback
            raise
        print(f"sralign {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _user_error(e: Exception, args: argparse.Namespace) -> str | None:
    """The one-line message for an error caused by the user's input or files; None for a bug."""
    import sqlite3

    from .config import ConfigError
    from .data.images import ImageError
    from .rewards.base import MetricError
    from .train.checkpoint import CheckpointError

    if isinstance(e, (ConfigError, CheckpointError, ImageError, MetricError)):
        return str(e)
    if isinstance(e, sqlite3.DatabaseError):
        store = getattr(args, "store", None)
        where = f"candidate store {store}: index {Path(store) / 'index.sqlite'}" if store else "an SQLite index"
        return f"{where} cannot be used ({e}); it is damaged, locked or not writable — restore it, or pass another --store"
    if isinstance(e, OSError) and e.filename is not None:
        what = {PermissionError: "permission denied", FileExistsError: "exists and is not a folder",
                NotADirectoryError: "a part of this path is a file, not a folder", IsADirectoryError: "is a folder, expected a file"}
        reason = what.get(type(e), e.strerror or str(e))
        return f"cannot write or read {e.filename}: {reason}; choose another output path or fix the permissions"
    return None


if __name__ == "__main__":
    sys.exit(main())
