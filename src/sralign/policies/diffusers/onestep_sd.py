"""OSEDiff / NAOSD-style one-step SR on a Stable Diffusion UNet + VAE, with peft LoRA.

z_lr = VAE(LR↑ in [-1,1]) (posterior mode × scaling factor); z_in = add_noise(z_lr, ε, t_noise)
(DDPM schedule); one UNet call at timestep t_diff; one DDPM step to the clean end,
x̂0 = (z_in − √(1−ᾱ_tdiff)·ε̂)/√ᾱ_tdiff; VAE decode.
- NAOSD / GDPO-SR (the default): t_noise 0.25 (noise added at 250), t_diff 0.10 (UNet at 100,
  the *unequal* timestep); fresh ε gives diverse outputs.
- OSEDiff: ``t_noise = 0`` adds NO noise (z_in = z_lr exactly), t_diff 0.999 (UNet at 999); the
  output is then deterministic. A converted ``osediff.pkl`` (``sralign convert osediff``) has its
  LoRA merged into ``unet/`` + ``vae/``.

Only the UNet's LoRA adapters train; ``reference()`` disables them (no second UNet in memory).
Weights load from a local diffusers folder (``vae/``, ``unet/``, optional ``scheduler/``,
``text_encoder/`` + ``tokenizer/``) with ``local_files_only=True``; nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ranged
from ..base import Cond, Samples
from .loading import (DTYPES, PromptEncoder, check_model_folder, check_precision, check_text_source, load_component, load_ddpm_scheduler,
                      prompt_encoder_or_none, rows_of, torch_dtype)
from .lora import LoraPolicyMixin
from .presets import Preset


@dataclass
class OneStepSDConfig:
    scale: int = 4
    t_noise: float = ranged(0.25, ge=0.0, le=1.0)  # noise level of the input (250 / 1000); 0 = no noise added (OSEDiff)
    t_diff: float = ranged(0.10, ge=0.0, le=1.0)  # timestep given to the UNet (100 / 1000; OSEDiff 0.999 -> 999)
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    prompt: str = ""
    dtype: str = ranged("fp32", choices=tuple(DTYPES))  # frozen UNet (+ text encoder) weights; LoRA stays fp32
    vae_dtype: str = ranged("fp32", choices=tuple(DTYPES))
    gradient_checkpointing: bool = True  # recompute UNet activations in backward (less memory, ~1.3x compute)


PRESETS = {
    "osediff": Preset(backend="osediff", paper="OSEDiff (test_osediff.py)", config=dict(t_noise=0.0, t_diff=0.999, dtype="fp16", vae_dtype="fp16"),
                      sampler="onestep", steps=1, colorfix="adain", prompt_template="{tags}, {prompt},",
                      notes="no noise added, UNet at t = 999; prompt = DAPE tags"),
    "gdpo-sr": Preset(backend="osediff", paper="GDPO-SR / NAOSD (GDPOSR/inferences/test.py)", config=dict(t_noise=0.25, t_diff=0.10),
                      sampler="onestep", steps=1, colorfix="adain", prompt_template="{tags}, {prompt},",
                      prompt="clean, high-resolution, 8k", notes="noise added at 250, UNet at 100; prompt = DAPE tags"),
}


class _SDModules(nn.Module):
    def __init__(self, vae: nn.Module, unet: nn.Module):
        super().__init__()
        self.vae, self.unet = vae, unet


class OneStepSD(LoraPolicyMixin):
    """One-step SD SR policy (implements ``SRPolicy``; sampler ``onestep`` only)."""

    kind = "onestep_sd"

    def __init__(self, vae, unet, scheduler, config: OneStepSDConfig | None = None, prompt_embeds: Tensor | None = None,
                 base_path: str | None = None, device: str | torch.device = "cpu", prompt_encoder: PromptEncoder | None = None):
        self._setup(config or OneStepSDConfig(), device, base_path, prompt_encoder, vae=vae, trained=unet)
        self.model = _SDModules(vae, unet).to(self.device)
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.vae_scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        cross = unet.config.cross_attention_dim
        if prompt_embeds is None:
            prompt_embeds = torch.zeros(1, 1, cross)  # the "empty" conditioning when no text encoder is given
        self.prompt_embeds = prompt_embeds.to(self.device, torch.float32)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: OneStepSDConfig | None = None, device: str = "cpu") -> "OneStepSD":
        """Load a diffusers folder (base model) or an sralign folder written by ``save`` (base path + LoRA)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        folder = Path(path)
        saved = cls._from_saved(folder, OneStepSDConfig, device)
        if saved is not None:
            return saved
        cfg = config or OneStepSDConfig()
        check_precision(cfg)
        check_model_folder(folder, ("vae", "unet"))
        vae = load_component(AutoencoderKL, folder, "vae", torch_dtype(cfg.vae_dtype))
        unet = load_component(UNet2DConditionModel, folder, "unet", torch_dtype(cfg.dtype))
        enc = prompt_encoder_or_none(folder, "clip", dtype=torch_dtype(cfg.dtype))
        check_text_source(folder, enc, {"prompt": cfg.prompt})
        emb = enc([cfg.prompt])["prompt_embeds"] if enc is not None else None
        return cls(vae, unet, load_ddpm_scheduler(folder), cfg, emb, base_path=str(folder.resolve()), device=device, prompt_encoder=enc)

    # ------------------------------------------------------------------ training helpers
    def _lora_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.model.unet}

    def to(self, device) -> "OneStepSD":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.alphas_cumprod = self.alphas_cumprod.to(self.device)
        self.prompt_embeds = self.prompt_embeds.to(self.device)
        self._place_prompt_encoder()
        return self

    # ------------------------------------------------------------------ the contract
    def _encode(self, img01: Tensor) -> Tensor:
        return self._vae_encode(img01) * self.vae_scale

    def condition(self, lr: Tensor, prompts: list[str] | None = None) -> Cond:
        """Encode LR [B,3,h,w]; ``prompts`` (one per image) replace the config's prompt for these rows."""
        text = self._text_features(prompts, lr.shape[0])  # checked before any encoding
        lr = lr.to(self.device, torch.float32)
        lr_up = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)
        feats = {"z_lr": self._encode(lr_up), **text}
        return Cond(lr=lr, lr_up=lr_up, features=feats)

    def noise_shape(self, cond: Cond, group: int = 1) -> tuple[int, ...]:
        b, c, h, w = cond.features["z_lr"].shape
        return (b * group, c, h, w)

    def noise_layout(self) -> tuple[int, int, int]:
        f = 2 ** (len(self.model.vae.config.block_out_channels) - 1)
        return self.model.unet.config.in_channels, f, f

    def dsm_noise_shape(self, x0: Tensor) -> tuple[int, ...]:
        f = 2 ** (len(self.model.vae.config.block_out_channels) - 1)
        return (x0.shape[0], self.model.unet.config.in_channels, x0.shape[2] // f, x0.shape[3] // f)

    def _steps(self, t: Tensor) -> Tensor:
        return (t.float() * 1000).round().clamp(0, 999).long()

    def _unet(self, z: Tensor, t_int: Tensor, cond: Cond) -> Tensor:
        emb = rows_of(cond.features, "prompt_embeds", self.prompt_embeds, z.shape[0])
        return self.model.unet(self._w(z), t_int, encoder_hidden_states=self._w(emb)).sample.float()

    def sample(self, cond: Cond, noise: Tensor, *, sampler: str = "onestep", steps: int = 1, return_trajectory: bool = False, **_) -> Samples:
        if sampler != "onestep":
            raise ValueError(f"OneStepSD samples with 'onestep' only (got {sampler!r}): it is a one-step model")
        n = noise.shape[0]
        if n % cond.batch_size:
            raise ValueError(f"noise batch {n} is not a multiple of the LR batch {cond.batch_size}")
        z_lr = cond.features["z_lr"].repeat_interleave(n // cond.batch_size, 0)
        td = self._steps(torch.full((n,), self.config.t_diff, device=self.device))
        if self.config.t_noise == 0:  # OSEDiff: the LR latent itself, no noise (``noise`` is unused)
            z_in = z_lr
        else:
            eps = noise.to(self.device, torch.float32)
            a_n = self.alphas_cumprod[self._steps(torch.full((n,), self.config.t_noise, device=self.device))][:, None, None, None]
            z_in = a_n.sqrt() * z_lr + (1 - a_n).sqrt() * eps
        eps_hat = self._unet(z_in, td, cond)
        a_d = self.alphas_cumprod[td][:, None, None, None]
        z0 = (z_in - (1 - a_d).sqrt() * eps_hat) / a_d.sqrt()
        return Samples(images=self._vae_decode(z0 / self.vae_scale))

    def dsm(self, x0: Tensor, cond: Cond, t: Tensor, noise: Tensor, t_model: Tensor | None = None) -> Tensor:
        """ε-prediction loss per sample [B] in latent space: x0 encoded by the VAE, noised at t,
        UNet queried at t_model (default t)."""
        z0 = self._encode_clean(x0)
        t = t.to(self.device).reshape(-1)
        ti = self._steps(t)
        tm = ti if t_model is None else self._steps(t_model.to(self.device).reshape(-1).expand_as(t))
        a = self.alphas_cumprod[ti][:, None, None, None]
        eps = noise.to(self.device, torch.float32)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        return ((self._unet(z_t, tm, cond) - eps) ** 2).flatten(1).mean(1)
