"""Loading local diffusers folders for the backends (never downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..tiny import PolicyLoadError

CONFIG_NAME = "sralign_policy.json"


def saved_policy_meta(folder: Path) -> dict | None:
    """The meta of a folder written by a backend's ``save`` (base path + config), or None."""
    f = folder / CONFIG_NAME
    return json.loads(f.read_text()) if f.is_file() else None


def check_model_folder(folder: Path, subfolders: tuple[str, ...]) -> None:
    if not folder.is_dir():
        raise PolicyLoadError(f"{folder}: no such model folder")
    for sub in subfolders:
        if not (folder / sub / "config.json").is_file():
            raise PolicyLoadError(f"missing {sub}/config.json in {folder}: this model folder needs "
                                  f"{', '.join(s + '/' for s in subfolders)} (config.json + diffusion_pytorch_model.safetensors each)")


def load_component(cls, folder: Path, sub: str):
    try:
        return cls.from_pretrained(folder, subfolder=sub, local_files_only=True)
    except OSError as e:
        raise PolicyLoadError(f"could not load {sub}/ from {folder}: {str(e).splitlines()[0]}") from None


def load_ddpm_scheduler(folder: Path):
    """The folder's DDPM scheduler, or SD's default schedule (scaled-linear 0.00085–0.012)."""
    from diffusers import DDPMScheduler

    if (folder / "scheduler" / "scheduler_config.json").is_file():
        return DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def encode_prompts(folder: Path, prompts: list[str]) -> list[torch.Tensor] | None:
    """CLIP embeddings [1,L,D] of ``prompts`` with the folder's text encoder, or None if it has none."""
    if not ((folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir()):
        return None
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    enc = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    with torch.no_grad():
        return [enc(tok([p], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids)[0]
                for p in prompts]
