"""ControlNet-SD2 SR (DP²O-SR's C-SD2): a Stable Diffusion UNet steered by a ControlNet that sees
the upsampled LR; multi-step DDIM ``ode`` sampling and stochastic DDIM (η > 0) ``sde`` sampling
with per-step Gaussian log-probs (for GRPO), classifier-free guidance, peft LoRA on the UNet
(optionally on the ControlNet). ``reference()`` disables the adapters.

Folder layout (local, ``local_files_only``): ``vae/``, ``unet/``, ``controlnet/`` (a published bare
state dict becomes one with ``sralign convert sd-controlnet``; ``fresh_controlnet`` initialises
one from the UNet instead, for training from scratch), optional ``scheduler/``, optional
``text_encoder/`` + ``tokenizer/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ranged
from ..base import Cond, Samples
from ..tiny import PolicyLoadError
from .loading import (DTYPES, PromptEncoder, check_model_folder, check_precision, check_text_source, load_component, load_ddpm_scheduler,
                      prompt_encoder_or_none, rows_of, torch_dtype)
from .lora import LoraPolicyMixin


@dataclass
class ControlNetSDConfig:
    scale: int = 4
    guidance_scale: float = 1.0  # DP²O-SR C-SD2: 3.5 (with a negative prompt)
    sde_noise_level: float = 1.0  # DDIM η of the sde sampler
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_on_controlnet: bool = False
    prompt: str = ""
    negative_prompt: str = ""
    fresh_controlnet: bool = False  # no controlnet/ in the folder: start one from the UNet (training from scratch)
    dtype: str = ranged("fp32", choices=tuple(DTYPES))  # frozen UNet/ControlNet/text weights; LoRA stays fp32
    vae_dtype: str = ranged("fp32", choices=tuple(DTYPES))
    gradient_checkpointing: bool = True


class _CNModules(nn.Module):
    def __init__(self, vae, unet, controlnet):
        super().__init__()
        self.vae, self.unet, self.controlnet = vae, unet, controlnet


class ControlNetSD(LoraPolicyMixin):
    """Multi-step ControlNet SR policy (implements ``SRPolicy``; samplers ``ode`` and ``sde``)."""

    kind = "controlnet_sd"

    def __init__(self, vae, unet, controlnet, scheduler, config: ControlNetSDConfig | None = None,
                 prompt_embeds: Tensor | None = None, negative_embeds: Tensor | None = None,
                 base_path: str | None = None, device: str | torch.device = "cpu", prompt_encoder: PromptEncoder | None = None):
        self._setup(config or ControlNetSDConfig(), device, base_path, prompt_encoder, vae=vae, trained=unet, controlnet=controlnet)
        self.model = _CNModules(vae, unet, controlnet).to(self.device)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.vae_scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        cross = unet.config.cross_attention_dim
        self.prompt_embeds = (prompt_embeds if prompt_embeds is not None else torch.zeros(1, 1, cross)).to(self.device)
        self.negative_embeds = (negative_embeds if negative_embeds is not None else torch.zeros_like(self.prompt_embeds)).to(self.device)

    @classmethod
    def from_pretrained(cls, path, config: ControlNetSDConfig | None = None, device: str = "cpu") -> "ControlNetSD":
        from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

        folder = Path(path)
        saved = cls._from_saved(folder, ControlNetSDConfig, device)
        if saved is not None:
            return saved
        cfg = config or ControlNetSDConfig()
        check_precision(cfg)
        check_model_folder(folder, ("vae", "unet"))
        has_cn = (folder / "controlnet" / "config.json").is_file()
        if not has_cn and not cfg.fresh_controlnet:
            raise PolicyLoadError(f"{folder} has no controlnet/ (config.json + diffusion_pytorch_model.safetensors): convert the published "
                                  f"ControlNet with `sralign convert sd-controlnet model.safetensors --base {folder} --out DIR`, "
                                  "or set fresh_controlnet=true to train a new one from the UNet")
        wd = torch_dtype(cfg.dtype)
        vae = load_component(AutoencoderKL, folder, "vae", torch_dtype(cfg.vae_dtype))
        unet = load_component(UNet2DConditionModel, folder, "unet", wd)
        cn = load_component(ControlNetModel, folder, "controlnet", wd) if has_cn else ControlNetModel.from_unet(unet)
        enc = prompt_encoder_or_none(folder, "clip", dtype=wd)
        check_text_source(folder, enc, {"prompt": cfg.prompt, "negative_prompt": cfg.negative_prompt})
        emb = enc([cfg.prompt, cfg.negative_prompt])["prompt_embeds"] if enc is not None else None
        return cls(vae, unet, cn, load_ddpm_scheduler(folder), cfg, None if emb is None else emb[:1], None if emb is None else emb[1:],
                   base_path=str(folder.resolve()), device=device, prompt_encoder=enc)

    def _lora_modules(self) -> dict[str, nn.Module]:
        mods = {"unet": self.model.unet}
        if self.config.lora_on_controlnet:
            mods["controlnet"] = self.model.controlnet
        return mods

    def to(self, device) -> "ControlNetSD":
        self.device = torch.device(device)
        self.model.to(self.device)
        for k in ("alphas_cumprod", "prompt_embeds", "negative_embeds"):
            setattr(self, k, getattr(self, k).to(self.device))
        self._place_prompt_encoder()
        return self

    # ------------------------------------------------------------------ the contract
    def _latent_factor(self) -> int:
        return 2 ** (len(self.model.vae.config.block_out_channels) - 1)

    def _encode(self, img01: Tensor) -> Tensor:
        return self._vae_encode(img01) * self.vae_scale

    def condition(self, lr: Tensor, prompts: list[str] | None = None) -> Cond:
        """Encode LR [B,3,h,w]; ``prompts`` (one per image) replace the config's prompt for these
        rows (the negative prompt stays the config's)."""
        text = self._text_features(prompts, lr.shape[0])  # checked before any encoding
        lr = lr.to(self.device, torch.float32)
        lr_up = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)
        feats = {"control": lr_up, **text}
        return Cond(lr=lr, lr_up=lr_up, features=feats)

    def noise_shape(self, cond: Cond, group: int = 1) -> tuple[int, ...]:
        b, _, h, w = cond.lr_up.shape
        f = self._latent_factor()
        return (b * group, self.model.unet.config.in_channels, h // f, w // f)

    def noise_layout(self) -> tuple[int, int, int]:
        f = 2 ** (len(self.model.vae.config.block_out_channels) - 1)
        return self.model.unet.config.in_channels, f, f

    def dsm_noise_shape(self, x0: Tensor) -> tuple[int, ...]:
        f = self._latent_factor()
        return (x0.shape[0], self.model.unet.config.in_channels, x0.shape[2] // f, x0.shape[3] // f)

    def _eps(self, z: Tensor, t_int: Tensor, features: dict[str, Tensor], guidance: float | None = None) -> Tensor:
        """ε̂ [n,C,h,w] with classifier-free guidance; ``features`` are a Cond's, with n rows."""
        g = self.config.guidance_scale if guidance is None else guidance
        n = z.shape[0]
        control, text = features["control"], rows_of(features, "prompt_embeds", self.prompt_embeds, n)
        if g != 1.0:
            neg = self.negative_embeds.expand(n, -1, -1)
            if neg.shape[1] != text.shape[1]:
                raise ValueError(f"negative prompt embedding length {neg.shape[1]} != prompt length {text.shape[1]}")
            z2, t2, c2 = torch.cat([z, z]), torch.cat([t_int, t_int]), torch.cat([control, control])
            emb = torch.cat([neg, text])
        else:
            z2, t2, c2, emb = z, t_int, control, text
        z2, emb, c2 = self._w(z2), self._w(emb), self._w(c2)
        down, mid = self.model.controlnet(z2, t2, encoder_hidden_states=emb, controlnet_cond=c2, return_dict=False)
        eps = self.model.unet(z2, t2, encoder_hidden_states=emb, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample.float()
        if g != 1.0:
            u, c = eps.chunk(2)
            eps = u + g * (c - u)
        return eps

    def timesteps(self, steps: int) -> Tensor:
        """DDIM timesteps [steps+1]: 999 down to 999/steps, then −1 (the clean end, ᾱ_0), so every
        step of the sde sampler has a positive variance."""
        if not 1 <= steps <= 1000:
            raise ValueError(f"steps must be in 1..1000, got {steps}")
        ts = torch.linspace(999, 0, steps + 1).round().long()[:-1]
        return torch.cat([ts, torch.tensor([-1])]).to(self.device)

    def _alpha(self, t: Tensor) -> Tensor:
        # the clean end uses ᾱ_0 (not 1) so the last stochastic step keeps a positive variance
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp_min(0)], self.alphas_cumprod[0])

    def sde_step(self, cond: Cond, x: Tensor, timesteps: Tensor, i: int, *, prev_sample: Tensor | None = None,
                 generator: torch.Generator | None = None, noise_level: float | None = None):
        """One DDIM step from timesteps[i] to timesteps[i+1] with η = noise_level (0 = ode).
        Returns (x_next, log_prob [B] (mean over dims), mean, std)."""
        eta = self.config.sde_noise_level if noise_level is None else noise_level
        t, t_prev = timesteps[i], timesteps[i + 1]
        a, a_prev = self._alpha(t), self._alpha(t_prev)
        eps = self._eps(x, t.expand(x.shape[0]), cond.features)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        std = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
        if std <= 0:
            return mean, torch.zeros(x.shape[0], device=x.device), mean, std
        if prev_sample is None:
            prev_sample = mean + std * torch.randn(x.shape, generator=generator).to(x.device)
        logp = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        return prev_sample, logp.flatten(1).mean(1), mean, std

    def sample(self, cond: Cond, noise: Tensor, *, sampler: str = "ode", steps: int = 20, return_trajectory: bool = False,
               generator: torch.Generator | None = None, noise_level: float | None = None) -> Samples:
        if sampler not in ("ode", "sde"):
            raise ValueError(f"ControlNetSD samples with 'ode' or 'sde' (got {sampler!r})")
        n = noise.shape[0]
        if n % cond.batch_size:
            raise ValueError(f"noise batch {n} is not a multiple of the LR batch {cond.batch_size}")
        c = cond.repeat(n // cond.batch_size)
        ts = self.timesteps(steps)
        x = noise.to(self.device, torch.float32)
        traj = [x] if (return_trajectory or sampler == "sde") else None
        logps = []
        for i in range(steps):
            x, lp, _, _ = self.sde_step(c, x, ts, i, generator=generator, noise_level=0.0 if sampler == "ode" else noise_level)
            if sampler == "sde":
                logps.append(lp)
            if traj is not None:
                traj.append(x)
        return Samples(images=self._vae_decode(x / self.vae_scale), trajectory=torch.stack(traj, 1) if traj is not None else None,
                       log_probs=torch.stack(logps, 1) if logps else None, sigmas=ts if traj is not None else None)

    def dsm(self, x0: Tensor, cond: Cond, t: Tensor, noise: Tensor, t_model: Tensor | None = None) -> Tensor:
        """ε-prediction loss per sample [B] in latent space (no guidance), ControlNet on LR↑."""
        n = x0.shape[0]
        c = cond.repeat(n // cond.batch_size) if n != cond.batch_size else cond
        z0 = self._encode_clean(x0)
        ti = (t.to(self.device).reshape(-1).float() * 1000).round().clamp(0, 999).long()
        tm = ti if t_model is None else (t_model.to(self.device).reshape(-1).expand_as(t).float() * 1000).round().clamp(0, 999).long()
        a = self.alphas_cumprod[ti][:, None, None, None]
        eps = noise.to(self.device, torch.float32)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        return ((self._eps(z_t, tm, c.features, guidance=1.0) - eps) ** 2).flatten(1).mean(1)
