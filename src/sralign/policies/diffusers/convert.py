"""Importers for the checkpoints the papers published -> complete local diffusers folders.

``convert(kind, src, base, out)`` (``sralign convert KIND SRC --base DIR --out DIR``):

- ``sd-controlnet`` (DP²O-SR's C-SD2 / DP²O-SD2): SRC is a bare diffusers ``ControlNetModel``
  state dict (``model.safetensors``, as ``ControlNetModel.from_unet(unet)`` with default settings
  lays it out) and BASE the SD2-base folder. Writes ``controlnet/config.json`` +
  ``controlnet/diffusion_pytorch_model.safetensors`` (the file's tensors unchanged).
- ``flux-controlnet`` (C-FLUX / DP²O-FLUX): a bare ``FluxControlNetModel.from_transformer(
  transformer, num_layers, num_single_layers)`` state dict (DP²O-SR: 4 and 0) over a FLUX.1-dev
  folder.
- ``osediff`` (cswry/OSEDiff's ``osediff.pkl``, a ``torch.save`` dict): the UNet LoRA (three
  adapters, rank ``rank_unet``, peft's alpha 8) with the full ``conv_in`` and the VAE-encoder LoRA
  (rank ``rank_vae``) over SD2.1-base. The adapters are **merged**: ``unet/`` and ``vae/`` hold
  OSEDiff's weights as plain diffusers models, so a ``OneStepSD`` on the folder *is* OSEDiff
  (and ``reference()`` stays OSEDiff when new LoRA adapters are trained on top). Sample it with
  ``t_noise=0, t_diff=0.999``.
- ``gdpo-sr`` (Joyies/GDPO's ``ckp/GDPOSR`` or any merged ``vae/`` + ``unet/`` one-step model):
  adds BASE's (SD2.1-base) ``text_encoder/``, ``tokenizer/``, ``scheduler/`` so prompts are
  encoded as the authors do.

Everything else of BASE (text encoders, tokenizers, scheduler, ...) is **symlinked** into OUT by
default (absolute links: nothing of several GB is duplicated; OUT breaks if BASE moves), or
copied with ``copy=True``. BASE is never modified.

Strict: the checkpoint's keys and shapes must be exactly what the model built from BASE's config
expects; a missing or unexpected key, a wrong shape or layer count raises ``ConvertError`` naming
it, before anything is written. OUT is assembled in a temporary folder beside it and renamed at
the end, so a failed conversion leaves nothing. ``.pkl`` / ``.pth`` / ``.bin`` files are read only
with ``torch.load(weights_only=True)``: a pickle holding anything but tensors, containers,
numbers and strings is refused.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

KINDS = ("sd-controlnet", "flux-controlnet", "osediff", "gdpo-sr")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: peft's default ``lora_alpha`` in the version OSEDiff trained with (peft 0.9.0): scale alpha/r = 2 at r = 4
OSEDIFF_LORA_ALPHA = 8
OSEDIFF_UNET_ADAPTERS = {"default_encoder": "unet_lora_encoder_modules", "default_decoder": "unet_lora_decoder_modules",
                         "default_others": "unet_lora_others_modules"}
OSEDIFF_KEYS = ("vae_lora_encoder_modules", *OSEDIFF_UNET_ADAPTERS.values(), "rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae")


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem (one line)."""


# ----------------------------------------------------------------------------- reading checkpoints
def load_pickle(path: Path) -> object:
    """``torch.load(path, weights_only=True)``: tensors, dicts, lists, numbers and strings only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), str(e).splitlines()[0])
        raise ConvertError(f"{path} holds a Python object other than tensors, dicts, lists, numbers and strings ({found}); "
                           "sralign reads pickles only with torch.load(weights_only=True) and will not run the code a full "
                           "pickle may carry: save the tensors with safetensors or torch.save(state_dict)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ConvertError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from None


class TensorFile:
    """A flat name -> tensor checkpoint: keys and shapes without loading (safetensors), tensors on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.safetensors = path.suffix == ".safetensors"
        if self.safetensors:
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as e:  # safetensors raises its own error types
                raise ConvertError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
            self._state = None
        else:
            state = load_pickle(path)
            self._state = as_state_dict(state, str(path))
            self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}

    def state(self) -> dict[str, Tensor]:
        if self._state is None:
            from safetensors.torch import load_file

            self._state = load_file(str(self.path))
        return self._state


def as_state_dict(obj: object, what: str) -> dict[str, Tensor]:
    """``obj`` checked to be a flat ``{str: Tensor}`` state dict."""
    if not isinstance(obj, dict):
        raise ConvertError(f"{what} must be a state dict (name -> tensor), got {type(obj).__name__}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise ConvertError(f"{what}: entry {k!r} is a {type(v).__name__}, not a tensor (a state dict holds tensors only)")
    return obj


# ----------------------------------------------------------------------------- strict key checks
def _layer_counts(keys) -> dict[str, int]:
    """Per indexed module list (``transformer_blocks``, ``down_blocks.0.resnets``, ...) its length."""
    out: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit() and i:
                pre = ".".join(parts[:i])
                out[pre] = max(out.get(pre, 0), int(part) + 1)
    return out


def _some(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_keys(expected: dict[str, tuple], got: dict[str, tuple], src: str, model: str, layer_hint: str = "") -> None:
    """``got`` (checkpoint key -> shape) must equal ``expected`` (the model built from the base's
    config): layer counts first, then missing keys, unexpected keys, shapes; one error each."""
    ce, cg = _layer_counts(expected), _layer_counts(got)
    for pre in sorted(set(ce) | set(cg), key=lambda p: (p.count("."), p)):
        if pre in ce and pre in cg and ce[pre] != cg[pre]:
            raise ConvertError(f"wrong layer count: {src} has {cg[pre]} {pre} (indices 0-{cg[pre] - 1}) where {model} has {ce[pre]}"
                               + (f"; {layer_hint}" if layer_hint else ""))
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    if missing:
        raise ConvertError(f"{src} lacks {len(missing)} key(s) that {model} needs: {_some(missing)}")
    if extra:
        raise ConvertError(f"{src} has {len(extra)} unexpected key(s) that {model} does not have: {_some(extra)}")
    for k in sorted(expected):
        if tuple(expected[k]) != tuple(got[k]):
            raise ConvertError(f"{src}: {k} has shape {list(got[k])} where {model} has {list(expected[k])}")


def _shapes(module: nn.Module, keep: Callable[[str], bool] = lambda k: True) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if keep(k)}


def _config(base: Path, sub: str) -> dict:
    f = base / sub / "config.json"
    if not f.is_file():
        raise ConvertError(f"--base {base} has no {sub}/config.json: give the base model's diffusers folder")
    return json.loads(f.read_text())


def _meta(cls, cfg: dict, **kw):
    """``cls`` built from a config on the meta device (structure only: no memory, no weights)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(cfg, **kw)


# ----------------------------------------------------------------------------- output folder
def _check_paths(src: Path, base: Path, out: Path) -> None:
    if not src.exists():
        raise ConvertError(f"{src}: no such file or folder")
    if not base.is_dir():
        raise ConvertError(f"--base {base}: no such folder (give the base model's diffusers folder)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} exists and is not empty: give a new folder (nothing is overwritten)")
    ro, rb = out.resolve(), base.resolve()
    if ro == rb or rb in ro.parents:
        raise ConvertError(f"--out {out} is inside --base {base}: write the converted model elsewhere (--base is never modified)")


def _link_or_copy(base: Path, tmp: Path, skip: set[str], copy: bool) -> list[str]:
    """Every entry of ``base`` except ``skip`` into ``tmp``: absolute symlinks, or copies."""
    done = []
    for entry in sorted(base.iterdir()):
        if entry.name in skip or entry.name.startswith("."):
            continue
        dst = tmp / entry.name
        if not copy:
            os.symlink(entry.resolve(), dst, target_is_directory=entry.is_dir())
        elif entry.is_dir():
            shutil.copytree(entry, dst)
        else:
            shutil.copy2(entry, dst)
        done.append(entry.name)
    return done


def _assemble(out: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a temporary folder beside ``out``, then rename it to ``out``; on any
    error the temporary folder is removed and ``out`` is untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.sralign-convert-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            out.rmdir()  # empty (checked)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_weights(folder: Path, cfg_module, tensors: TensorFile | dict[str, Tensor]) -> None:
    """``folder/config.json`` (from ``cfg_module``'s config) + the weights as safetensors."""
    from safetensors.torch import save_file

    folder.mkdir()
    cfg_module.save_config(folder)
    if isinstance(tensors, TensorFile) and tensors.safetensors:
        shutil.copyfile(tensors.path, folder / WEIGHTS_NAME)  # byte for byte: names and dtypes already right
    else:
        state = tensors.state() if isinstance(tensors, TensorFile) else tensors
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME))


# ----------------------------------------------------------------------------- the kinds
def convert_sd_controlnet(src: Path, base: Path, out: Path, *, copy: bool = False) -> Path:
    """A bare ``ControlNetModel.from_unet(unet)`` state dict + SD2-base -> a C-SD2 folder."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    _check_paths(src, base, out)
    _config(base, "vae")
    unet = _meta(UNet2DConditionModel, _config(base, "unet"))
    with torch.device("meta"):
        cn = ControlNetModel.from_unet(unet, load_weights_from_unet=False)  # DP²O-SR's defaults
    f = TensorFile(src)
    check_keys(_shapes(cn), f.shapes, str(src), f"ControlNetModel.from_unet({base / 'unet'})",
               "the ControlNet was made from another UNet than --base's")

    def write(tmp: Path) -> None:
        _write_weights(tmp / "controlnet", cn, f)
        _link_or_copy(base, tmp, {"controlnet"}, copy)

    return _assemble(out, write)


def convert_flux_controlnet(src: Path, base: Path, out: Path, *, num_layers: int = 4, num_single_layers: int = 0,
                            copy: bool = False) -> Path:
    """A bare ``FluxControlNetModel.from_transformer(tr, num_layers, num_single_layers)`` state dict
    + a FLUX folder -> a C-FLUX folder."""
    from diffusers import FluxControlNetModel

    if num_layers < 0 or num_single_layers < 0:
        raise ConvertError(f"--num-layers and --num-single-layers must be >= 0, got {num_layers} and {num_single_layers}")
    _check_paths(src, base, out)
    _config(base, "vae")
    tr_cfg = _config(base, "transformer")
    # what from_transformer does: the transformer's config with the ControlNet's layer counts
    cn = _meta(FluxControlNetModel, dict(tr_cfg, num_layers=num_layers, num_single_layers=num_single_layers))
    f = TensorFile(src)
    counts = _layer_counts(f.shapes)
    hint = (f"the file has {counts.get('transformer_blocks', 0)} double-stream and {counts.get('single_transformer_blocks', 0)} "
            f"single-stream blocks; pass --num-layers {counts.get('transformer_blocks', 0)} "
            f"--num-single-layers {counts.get('single_transformer_blocks', 0)} (DP²O-SR's C-FLUX: 4 and 0)")
    for name, n in (("transformer_blocks", num_layers), ("single_transformer_blocks", num_single_layers)):
        if counts.get(name, 0) != n:
            flag = "--num-layers" if name == "transformer_blocks" else "--num-single-layers"
            raise ConvertError(f"wrong layer count: {src} has {counts.get(name, 0)} {name}, {flag} says {n}; {hint}")
    check_keys(_shapes(cn), f.shapes, str(src), f"FluxControlNetModel.from_transformer({base / 'transformer'}, "
               f"num_layers={num_layers}, num_single_layers={num_single_layers})", hint)

    def write(tmp: Path) -> None:
        _write_weights(tmp / "controlnet", cn, f)
        _link_or_copy(base, tmp, {"controlnet"}, copy)

    return _assemble(out, write)


def _osediff_fields(ck: object, src: Path) -> dict:
    if not isinstance(ck, dict):
        raise ConvertError(f"{src} must hold OSEDiff's checkpoint dict, got {type(ck).__name__}")
    missing, extra = [k for k in OSEDIFF_KEYS if k not in ck], [str(k) for k in ck if k not in OSEDIFF_KEYS]
    if len(missing) == len(OSEDIFF_KEYS):
        raise ConvertError(f"{src} is not an OSEDiff checkpoint (a torch.save dict of {', '.join(OSEDIFF_KEYS)}); "
                           f"it holds {_some(map(str, ck), 4) or 'nothing'}")
    if missing:
        raise ConvertError(f"{src} lacks {', '.join(missing)}: not an OSEDiff checkpoint (its keys: {', '.join(map(str, OSEDIFF_KEYS))})")
    if extra:
        raise ConvertError(f"{src} has unexpected key(s) {', '.join(extra)}: not an OSEDiff checkpoint (its keys: {', '.join(OSEDIFF_KEYS)})")
    for k in ("rank_unet", "rank_vae"):
        if isinstance(ck[k], bool) or not isinstance(ck[k], int) or ck[k] < 1:
            raise ConvertError(f"{src}: {k} must be a positive integer, got {ck[k]!r}")
    for k in ("vae_lora_encoder_modules", *OSEDIFF_UNET_ADAPTERS.values()):
        if not isinstance(ck[k], (list, tuple)) or not ck[k] or not all(isinstance(x, str) for x in ck[k]):
            raise ConvertError(f"{src}: {k} must be a non-empty list of module names, got {type(ck[k]).__name__}")
    for k in ("state_dict_unet", "state_dict_vae"):
        as_state_dict(ck[k], f"{src}: {k}")
    return ck


def _add_osediff_adapters(model: nn.Module, adapters: dict[str, list[str]], rank: int, where: str, src: Path) -> None:
    """The adapters as OSEDiff declares them (peft LoRA, rank, alpha 8), all active."""
    from peft import LoraConfig

    names = {n for n, _ in model.named_modules()}
    for adapter, targets in adapters.items():
        unknown = sorted(set(targets) - names)
        if unknown:
            hint = ("wrong layer count: " if any(re.search(r"\.\d+\.", u) for u in unknown) else "")
            raise ConvertError(f"{hint}{src} lists {len(unknown)} LoRA target module(s) that {where} does not have: {_some(unknown)} "
                               "(a checkpoint of another base model?)")
        with warnings.catch_warnings():  # several adapters on one model is OSEDiff's design, not an accident
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model.add_adapter(LoraConfig(r=rank, lora_alpha=OSEDIFF_LORA_ALPHA, init_lora_weights="gaussian",
                                         target_modules=sorted(set(targets))), adapter_name=adapter)
    model.set_adapter(list(adapters))


def _merged_state(model: nn.Module) -> dict[str, Tensor]:
    """Every peft LoRA layer's adapters merged into its base weight; the plain model's state dict."""
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.merge(adapter_names=list(m.lora_A.keys()))
    return {k.replace(".base_layer.", "."): v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" not in k}


def _osediff_parts(ck: dict) -> tuple[dict, dict]:
    unet_ad = {a: list(ck[k]) for a, k in OSEDIFF_UNET_ADAPTERS.items()}
    vae_ad = {"default_encoder": list(ck["vae_lora_encoder_modules"])}
    return unet_ad, vae_ad


def _unet_keep(k: str) -> bool:  # what OSEDiff saves of the UNet: every LoRA weight and the whole conv_in
    return "lora" in k or "conv_in" in k


def convert_osediff(src: Path, base: Path, out: Path, *, copy: bool = False) -> Path:
    """``osediff.pkl`` + SD2.1-base -> a OneStepSD folder with OSEDiff's LoRA merged."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _check_paths(src, base, out)
    unet_cfg, vae_cfg = _config(base, "unet"), _config(base, "vae")
    ck = _osediff_fields(load_pickle(src), src)
    unet_ad, vae_ad = _osediff_parts(ck)
    # structure first, on the meta device: the adapters must land on the base's modules and the
    # saved tensors must be exactly those OSEDiff's loader copies
    plain = {}
    for name, cls, cfg, ad, rank, keep, sd in (
            ("unet", UNet2DConditionModel, unet_cfg, unet_ad, ck["rank_unet"], _unet_keep, ck["state_dict_unet"]),
            ("vae", AutoencoderKL, vae_cfg, vae_ad, ck["rank_vae"], lambda k: "lora" in k, ck["state_dict_vae"])):
        m = _meta(cls, cfg)
        plain[name] = _shapes(m)
        _add_osediff_adapters(m, ad, rank, f"{base / name}", src)
        check_keys(_shapes(m, keep), {k: tuple(v.shape) for k, v in sd.items()}, f"{src}: state_dict_{name}",
                   f"{base / name} with OSEDiff's adapters (rank {rank})")

    def write(tmp: Path) -> None:
        for name, cls, ad, rank, sd in (("unet", UNet2DConditionModel, unet_ad, ck["rank_unet"], ck["state_dict_unet"]),
                                        ("vae", AutoencoderKL, vae_ad, ck["rank_vae"], ck["state_dict_vae"])):
            model = cls.from_pretrained(base, subfolder=name, local_files_only=True, torch_dtype=torch.float32)
            _add_osediff_adapters(model, ad, rank, f"{base / name}", src)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in sd.items():
                    params[k].copy_(v.to(torch.float32))
            state = _merged_state(model)
            if set(state) != set(plain[name]):  # the merge must give back the plain model's layout
                raise ConvertError(f"merging OSEDiff's {name} LoRA gave keys {_some(set(state) ^ set(plain[name]))} "
                                   "that a plain model lacks or has")
            _write_weights(tmp / name, model, state)
            log.info("osediff: merged %d LoRA tensors into %s/", sum(".lora_" in k for k in sd), name)
        _link_or_copy(base, tmp, {"unet", "vae"}, copy)

    return _assemble(out, write)


def convert_gdpo_sr(src: Path, base: Path, out: Path, *, copy: bool = False) -> Path:
    """A merged one-step folder (``vae/`` + ``unet/``, e.g. GDPO-SR's ``ckp/GDPOSR``) + SD2.1-base's
    text encoder, tokenizer and scheduler -> a complete OneStepSD folder."""
    _check_paths(src, base, out)
    if not src.is_dir():
        raise ConvertError(f"{src} must be a folder with vae/ and unet/ (GDPO-SR: ckp/GDPOSR)")
    unet_cfg = _config(src, "unet")
    _config(src, "vae")
    te = _config(base, "text_encoder")
    if not (base / "tokenizer").is_dir():
        raise ConvertError(f"--base {base} has no tokenizer/: give SD2.1-base's diffusers folder")
    if te.get("hidden_size") != unet_cfg.get("cross_attention_dim"):
        raise ConvertError(f"--base {base}'s text encoder has width {te.get('hidden_size')} but {src}/unet expects "
                           f"{unet_cfg.get('cross_attention_dim')}: give the base model the UNet was trained from (SD2.1-base)")

    def write(tmp: Path) -> None:
        for name in ("vae", "unet"):
            if copy:
                shutil.copytree(src / name, tmp / name)
            else:
                os.symlink((src / name).resolve(), tmp / name, target_is_directory=True)
        _link_or_copy(base, tmp, {"vae", "unet", "controlnet"}, copy)

    return _assemble(out, write)


def convert(kind: str, src: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *, num_layers: int = 4,
            num_single_layers: int = 0, copy: bool = False) -> Path:
    """Convert the published checkpoint ``src`` of ``kind`` (one of ``KINDS``) over the base model
    folder ``base`` into the new folder ``out`` (see the module docstring). Returns ``out``."""
    src, base, out = Path(src), Path(base), Path(out)
    if kind == "sd-controlnet":
        return convert_sd_controlnet(src, base, out, copy=copy)
    if kind == "flux-controlnet":
        return convert_flux_controlnet(src, base, out, num_layers=num_layers, num_single_layers=num_single_layers, copy=copy)
    if kind == "osediff":
        return convert_osediff(src, base, out, copy=copy)
    if kind == "gdpo-sr":
        return convert_gdpo_sr(src, base, out, copy=copy)
    raise ConvertError(f"unknown checkpoint kind {kind!r}: one of {', '.join(KINDS)}")
