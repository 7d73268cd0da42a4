"""What every LoRA-adapted diffusers policy shares: adapters on, off (the reference), saved, loaded."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from ..tiny import PolicyLoadError

LORA_NAME = "lora.safetensors"


def add_lora(module: nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    from peft import LoraConfig

    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))


class LoraPolicyMixin:
    """Needs ``self._lora_modules() -> dict[name, diffusers model with a peft adapter]``,
    ``self.config`` (a dataclass), ``self.base_path`` and a class attribute ``kind``."""

    kind = ""

    def save(self, path: str | os.PathLike) -> None:
        """Write the LoRA weights and a config that points at the base model folder."""
        import json
        from dataclasses import asdict

        from .loading import CONFIG_NAME

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_lora(folder)
        meta = {"type": self.kind, "base_path": self.base_path, "config": asdict(self.config)}
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @classmethod
    def _from_saved(cls, folder: Path, config_cls, device):
        """A policy from a folder written by ``save`` (base model + LoRA), or None."""
        from .loading import saved_policy_meta

        meta = saved_policy_meta(folder)
        if meta is None:
            return None
        pol = cls.from_pretrained(meta["base_path"], config_cls(**meta["config"]), device=device)
        pol.load(folder)
        return pol

    def _setup(self, config, device, base_path: str | None, prompt_encoder, *, vae: nn.Module, trained: nn.Module,
               controlnet: nn.Module | None = None) -> None:
        """What every backend's constructor does: config, scale, device, base path; the VAE (and
        the ControlNet) frozen; LoRA on the trained network (and on the ControlNet when
        ``config.lora_on_controlnet``); the prompt encoder placed on the device."""
        from .loading import check_precision, enable_checkpointing, set_precision, torch_dtype

        check_precision(config)
        self.config, self.scale, self.device, self.base_path = config, config.scale, torch.device(device), base_path
        self.weight_dtype, self.vae_dtype = torch_dtype(config.dtype), torch_dtype(config.vae_dtype, "vae_dtype")
        vae.requires_grad_(False).eval()
        if controlnet is not None:
            controlnet.requires_grad_(False)
        add_lora(trained, config.lora_rank, config.lora_alpha, config.lora_targets)
        if controlnet is not None and getattr(config, "lora_on_controlnet", False):
            add_lora(controlnet, config.lora_rank, config.lora_alpha, config.lora_targets)
        # frozen weights in config.dtype (the VAE in vae_dtype), LoRA parameters in fp32
        set_precision(vae, self.vae_dtype)
        for m in (trained, controlnet):
            if m is not None:
                set_precision(m, self.weight_dtype)
        if config.gradient_checkpointing:
            enable_checkpointing(trained, controlnet)
        self.prompt_encoder = prompt_encoder
        self._place_prompt_encoder()

    def _w(self, x: Tensor) -> Tensor:
        """A floating input cast to the backbone's weight dtype (outputs go back with ``.float()``)."""
        return x.to(self.weight_dtype)

    def _vae_encode(self, img01: Tensor) -> Tensor:
        """VAE posterior mode of images in [0,1] [B,3,H,W] -> unscaled latents (fp32), no grad."""
        with torch.no_grad():
            return self.model.vae.encode((img01 * 2 - 1).to(self.vae_dtype)).latent_dist.mode().float()

    def _vae_decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> images in [0,1] (fp32)."""
        return ((self.model.vae.decode(z.to(self.vae_dtype)).sample.float() + 1) / 2).clamp(0, 1)

    def _text_features(self, prompts: list[str] | None, batch: int) -> dict[str, Tensor]:
        """Cond features for per-image ``prompts`` (one per LR image; None: none, the configured
        prompt applies), checked and encoded with the folder's own text encoder(s)."""
        from .loading import check_prompts

        check_prompts(prompts, batch, self.prompt_encoder, self.base_path)
        return {} if prompts is None else self.prompt_encoder(prompts)

    def _place_prompt_encoder(self) -> None:
        """Embeddings come out on the policy's device (the encoders themselves stay where they are)."""
        if self.prompt_encoder is not None:
            self.prompt_encoder.device = self.device

    def _lora_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _lora_state(self) -> dict[str, Tensor]:
        from peft import get_peft_model_state_dict

        out = {}
        for name, m in self._lora_modules().items():
            for k, v in get_peft_model_state_dict(m).items():
                out[f"{name}.{k}"] = v.detach().cpu().contiguous()
        return out

    def _save_lora(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tmp = folder / (LORA_NAME + ".tmp")
        save_file(self._lora_state(), str(tmp))
        os.replace(tmp, folder / LORA_NAME)

    def load(self, path: str | os.PathLike) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        f = Path(path) / LORA_NAME
        if not f.is_file():
            raise PolicyLoadError(f"missing LoRA weights file {LORA_NAME} in {path}")
        state = load_file(str(f), device=str(self.device))
        for name, m in self._lora_modules().items():
            pre = name + "."
            set_peft_model_state_dict(m, {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)})

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self._lora_state().items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        return h.hexdigest()[:16]

    def freeze_reference(self) -> None:
        """The reference is the base model with adapters disabled: nothing to copy."""

    @contextmanager
    def reference(self):
        mods = list(self._lora_modules().values())
        for m in mods:
            m.disable_adapters()
        try:
            yield self
        finally:
            for m in mods:
                m.enable_adapters()

    def _encode_clean(self, x0: Tensor) -> Tensor:
        """VAE latents of clean training images ``x0`` for ``dsm``, remembered for the next call
        with the very same (unmodified) tensor: trainers score one batch with the policy and then
        with the reference, and the frozen VAE gives the same latents both times."""
        key = (id(x0), x0._version, str(x0.device), tuple(x0.shape))
        hit = getattr(self, "_clean_latents", None)
        if hit is not None and hit[0] == key and hit[1] is x0:
            return hit[2]
        z = self._encode(x0.to(self.device, torch.float32))
        self._clean_latents = (key, x0, z)
        return z

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for m in self._lora_modules().values() for p in m.parameters() if p.requires_grad)
