"""Presets that reproduce each paper's inference, and loading a backend with settings.

Each backend module declares its presets in a ``PRESETS`` dict (they live with the backend they
belong to); this module collects them (``all_presets`` / ``get_preset``) and builds a policy
from a preset plus the user's settings: backend config defaults ← the preset ← a YAML file
(``--policy-config``) ← ``policy.KEY=VALUE`` overrides ← ``--dtype``. Every value is checked
against the backend's config dataclass before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tiny import PolicyLoadError

DTYPES = ("fp32", "fp16", "bf16")
# --policy NAME (with --model-path) -> backend class name
BACKENDS = {"osediff": "OneStepSD", "naosd": "OneStepSD", "controlnet-sd": "ControlNetSD", "flux": "FluxControlNet"}
KIND_TO_BACKEND = {"onestep_sd": "osediff", "controlnet_sd": "controlnet-sd", "flux_controlnet": "flux"}


@dataclass(frozen=True)
class Preset:
    """One paper's inference settings.

    backend: ``controlnet-sd`` | ``flux`` | ``osediff`` (the ``--policy`` name).
    config: values of the backend's config dataclass (guidance, negative prompt, precision, …).
    sampler, steps: how ``sr`` / ``generate`` / ``eval`` sample.
    colorfix: ``sr``'s colour correction towards the upsampled LR.
    prompt_template: ``sr``'s per-image text; ``{tags}`` is the image's tags (IMG.txt beside the
        image, or ``--prompt-source``), ``{prompt}`` the user prompt (``--prompt``, else ``prompt``).
    """

    backend: str
    paper: str
    config: dict[str, Any]
    sampler: str
    steps: int
    colorfix: str = "adain"
    prompt_template: str = "{tags}"
    prompt: str = ""
    notes: str = ""

    def text(self, tags: str | None, prompt: str | None) -> str:
        return self.prompt_template.format(tags=tags or "", prompt=self.prompt if prompt is None else prompt)


def all_presets() -> dict[str, Preset]:
    """Every backend's presets, by name."""
    from . import controlnet_sd, flux_controlnet, onestep_sd

    out: dict[str, Preset] = {}
    for mod in (controlnet_sd, flux_controlnet, onestep_sd):
        out.update(getattr(mod, "PRESETS", {}))
    return out


def get_preset(name: str) -> Preset:
    presets = all_presets()
    if name not in presets:
        raise PolicyLoadError(f"unknown preset {name!r}; choose one of {', '.join(sorted(presets))}")
    return presets[name]


def _backend_class(name: str):
    from . import ControlNetSD, FluxControlNet, OneStepSD

    return {"OneStepSD": OneStepSD, "ControlNetSD": ControlNetSD, "FluxControlNet": FluxControlNet}[BACKENDS[name]]


def _resolve(spec: str | None, model_path: str | None, preset: Preset | None) -> tuple[str, Path, dict | None, Path | None]:
    """(backend name, diffusers base folder, saved config or None, saved LoRA folder or None)."""
    spec = spec or "tiny"
    if model_path:
        if spec == "tiny" and preset is not None:
            spec = preset.backend
        if spec not in BACKENDS:
            raise PolicyLoadError(f"--model-path goes with --policy {' | '.join(BACKENDS)} (or a --preset)")
        return spec, Path(model_path), None, None
    folder = Path(spec)
    meta_file = folder / "sralign_policy.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        kind = KIND_TO_BACKEND.get(meta.get("type"))
        if kind is None:
            raise PolicyLoadError(f"{folder}: policy type {meta.get('type')!r} takes no backend settings")
        return kind, Path(meta["base_path"]), meta.get("config", {}), folder
    if (folder / "vae").is_dir() and (folder / "transformer").is_dir():
        return "flux", folder, None, None
    if (folder / "vae").is_dir() and (folder / "unet").is_dir():
        return ("controlnet-sd" if (folder / "controlnet").is_dir() else "osediff"), folder, None, None
    if spec in BACKENDS:
        raise PolicyLoadError(f"--policy {spec} needs --model-path DIR (a local diffusers model folder)")
    raise PolicyLoadError(f"{spec}: policy settings (--preset, --dtype, policy.KEY=VALUE) apply to the diffusers backends "
                          f"({', '.join(BACKENDS)}), not to the tiny policy")


def backend_config(cls_name: str, preset: Preset | None = None, saved: dict | None = None, yaml_path: str | None = None,
                   overrides: list[str] | None = None, dtype: str | None = None):
    """The backend's config: defaults ← saved ← preset ← YAML ← ``KEY=VALUE`` overrides ← dtype, validated
    (unknown keys and out-of-range values raise ``ConfigError`` naming the valid keys / range)."""
    import yaml

    from ...config import ConfigError, apply_overrides, from_dict
    from . import controlnet_sd, flux_controlnet, onestep_sd

    config_cls = {"ControlNetSD": controlnet_sd.ControlNetSDConfig, "FluxControlNet": flux_controlnet.FluxControlNetConfig,
                  "OneStepSD": onestep_sd.OneStepSDConfig}[cls_name]
    data = dataclasses.asdict(config_cls())
    data.update(saved or {})
    data.update(preset.config if preset else {})
    if yaml_path:
        f = Path(yaml_path)
        if not f.is_file():
            raise ConfigError(f"policy config file {f} not found")
        loaded = yaml.safe_load(f.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"policy config file {f} must hold a mapping of the backend's settings (e.g. guidance_scale: 3.5)")
        data.update(loaded)
    apply_overrides(data, list(overrides or []))
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {' | '.join(DTYPES)}, got {dtype!r}")
        data["dtype"] = dtype
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise ConfigError(f"unknown policy setting(s) {', '.join(unknown)} for {config_cls.__name__}; valid keys: "
                          f"{', '.join(f.name for f in dataclasses.fields(config_cls))}")
    return from_dict(config_cls, data)


def load_policy_with_settings(spec: str | None, model_path: str | None = None, *, preset: str | None = None,
                              policy_config: str | None = None, overrides: list[str] | None = None, dtype: str | None = None,
                              device: str = "cpu"):
    """A policy from ``spec`` (``--policy``) / ``model_path``, with a preset and settings applied.
    ``overrides`` are ``KEY=VALUE`` strings for the backend's config (without the ``policy.`` prefix).
    Without any setting this is ``load_policy``."""
    from .. import load_policy

    if preset is None and policy_config is None and not overrides and dtype is None:
        return load_policy(f"{spec}:{model_path}" if model_path else spec, device=device)
    pre = get_preset(preset) if preset else None
    backend, base, saved, lora_folder = _resolve(spec, model_path, pre)
    if pre is not None and BACKENDS[pre.backend] != BACKENDS[backend]:
        raise PolicyLoadError(f"preset {preset} is for --policy {pre.backend}, but this model is a {backend} model")
    cls_name = BACKENDS[backend]
    cfg = backend_config(cls_name, pre, saved, policy_config, overrides, dtype)
    pol = _backend_class(backend).from_pretrained(base, cfg, device=device)
    if lora_folder is not None:
        pol.load(lora_folder)
    return pol


def presets_table() -> str:
    """Markdown table of every preset (the README's)."""
    rows = ["| preset | paper | backend | sampler, steps | settings | colour fix | prompt |", "|---|---|---|---|---|---|---|"]
    for name, p in sorted(all_presets().items()):
        settings = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in p.config.items())
        rows.append(f"| `{name}` | {p.paper} | {p.backend} | {p.sampler}, {p.steps} | {settings} | {p.colorfix} | "
                    f"`{p.prompt_template}`{f' (prompt {p.prompt!r})' if p.prompt else ''} |")
    return "\n".join(rows)
