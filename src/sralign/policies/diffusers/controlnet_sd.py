"""ControlNet-SD2 SR (DP²O-SR's C-SD2): a Stable Diffusion UNet steered by a ControlNet that sees
the upsampled LR. Samplers, all on the model folder's scheduler config (see ``sd_schedule``):
``ode`` (DDIM η = 0), ``sde`` (DDIM η = ``sde_noise_level``) and ``ddpm`` (ancestral DDPM, the
authors' C-SD2 inference), the stochastic ones with per-step Gaussian log-probs (for GRPO);
``prediction_type`` epsilon / v_prediction / sample; classifier-free guidance with a negative
prompt when ``guidance_scale`` > 1 (as diffusers); peft LoRA on the UNet (optionally on the
ControlNet). ``reference()`` disables the adapters.

Folder layout (local, ``local_files_only``): ``vae/``, ``unet/``, ``controlnet/`` (a published bare
state dict becomes one with ``sralign convert sd-controlnet``; ``fresh_controlnet`` initialises
one from the UNet instead, for training from scratch), optional ``scheduler/`` (else SD 2-base's
schedule), optional ``text_encoder/`` + ``tokenizer/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ...config import ranged
from ..base import Cond, Samples
from ..tiny import PolicyLoadError
from .loading import (DTYPES, PromptEncoder, check_model_folder, check_precision, check_text_source, load_component,
                      prompt_encoder_or_none, rows_of, torch_dtype)
from .lora import LoraPolicyMixin
from .presets import Preset
from .sd_schedule import DDIM, DDPM, SDSchedule, gaussian_log_prob, read_scheduler_config
from .upsample import UPSAMPLERS, upsample

SD_SAMPLERS = ("ode", "sde", "ddpm")


@dataclass
class ControlNetSDConfig:
    scale: int = ranged(4, ge=1)
    guidance_scale: float = ranged(1.0, ge=0)  # CFG only when > 1 (as diffusers); C-SD2: 3.5 with a negative prompt
    controlnet_scale: float = 1.0  # the ControlNet residuals' weight (diffusers' controlnet_conditioning_scale)
    sde_noise_level: float = ranged(1.0, ge=0)  # DDIM η of the sde sampler
    resize: str = ranged("bicubic", choices=UPSAMPLERS)  # LR upsampling for the ControlNet input
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


PRESETS = {
    "c-sd2": Preset(
        backend="controlnet-sd", paper="DP²O-SR C-SD2 / DP²O-SD2 (test_sd2b_controlnet.py)",
        config=dict(guidance_scale=3.5, negative_prompt="dotted, noise, blur, lowres, smooth", controlnet_scale=1.0,
                    resize="pil-bicubic", dtype="fp16", vae_dtype="fp32"),
        sampler="ddpm", steps=50, colorfix="adain", prompt_template="{tags}",
        notes="StableDiffusionControlNetPipeline with the folder's DDPMScheduler; prompt = RAM/DAPE tags"),
}


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
        self.schedule = (scheduler if isinstance(scheduler, SDSchedule) else SDSchedule(dict(scheduler.config))).to(self.device)
        self.alphas_cumprod = self.schedule.alphas_cumprod
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
        return cls(vae, unet, cn, SDSchedule(read_scheduler_config(folder)), cfg, None if emb is None else emb[:1], None if emb is None else emb[1:],
                   base_path=str(folder.resolve()), device=device, prompt_encoder=enc)

    def _lora_modules(self) -> dict[str, nn.Module]:
        mods = {"unet": self.model.unet}
        if self.config.lora_on_controlnet:
            mods["controlnet"] = self.model.controlnet
        return mods

    def to(self, device) -> "ControlNetSD":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.schedule.to(self.device)
        self.alphas_cumprod = self.schedule.alphas_cumprod
        for k in ("prompt_embeds", "negative_embeds"):
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
        lr_up = upsample(lr, self.scale, self.config.resize)
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

    def _model_out(self, z: Tensor, t_int: Tensor, features: dict[str, Tensor], guidance: float | None = None) -> Tensor:
        """The UNet's output [n,C,h,w] (ε, v or x₀ by ``prediction_type``), guided by the negative
        prompt when the guidance scale is > 1; ``features`` are a Cond's, with n rows."""
        g = self.config.guidance_scale if guidance is None else guidance
        n = z.shape[0]
        control, text = features["control"], rows_of(features, "prompt_embeds", self.prompt_embeds, n)
        cfg = g > 1.0
        if cfg:
            neg = self.negative_embeds.expand(n, -1, -1)
            if neg.shape[1] != text.shape[1]:
                raise ValueError(f"negative prompt embedding length {neg.shape[1]} != prompt length {text.shape[1]}")
            z2, t2, c2 = torch.cat([z, z]), torch.cat([t_int, t_int]), torch.cat([control, control])
            emb = torch.cat([neg, text])
        else:
            z2, t2, c2, emb = z, t_int, control, text
        z2, emb, c2 = self._w(z2), self._w(emb), self._w(c2)
        down, mid = self.model.controlnet(z2, t2, encoder_hidden_states=emb, controlnet_cond=c2,
                                          conditioning_scale=self.config.controlnet_scale, return_dict=False)
        out = self.model.unet(z2, t2, encoder_hidden_states=emb, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample.float()
        if cfg:
            u, c = out.chunk(2)
            out = u + g * (c - u)
        return out

    def schedule_for(self, sampler: str, steps: int) -> Tensor:
        """The ``[steps+1, 3]`` schedule of ``sampler`` (see ``sd_schedule``): DDIM grid for
        ``ode``/``sde``, DDPM grid for ``ddpm``, both from the folder's scheduler config."""
        if sampler not in SD_SAMPLERS:
            raise ValueError(f"ControlNetSD samples with {', '.join(map(repr, SD_SAMPLERS))} (got {sampler!r})")
        return self.schedule.table(DDPM if sampler == "ddpm" else DDIM, steps)

    def sde_step(self, cond: Cond, x: Tensor, timesteps: Tensor, i: int, *, prev_sample: Tensor | None = None,
                 generator: torch.Generator | None = None, noise_level: float | None = None):
        """Step ``i`` of schedule ``timesteps`` (from ``schedule_for``): DDIM with η =
        ``noise_level`` (0 = ode), or ancestral DDPM (η not used). Returns (x_next, log_prob [B]
        (mean over dims; 0 for a deterministic step), mean, std)."""
        eta = self.config.sde_noise_level if noise_level is None else noise_level
        row = timesteps[i]
        out = self._model_out(x, row[0].long().expand(x.shape[0]), cond.features)
        mean, std = self.schedule.step(out, x, row, eta)
        if std <= 0:
            return mean, torch.zeros(x.shape[0], device=x.device), mean, std
        if prev_sample is None:
            prev_sample = mean + std * torch.randn(x.shape, generator=generator).to(x.device)
        return prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std

    def sample(self, cond: Cond, noise: Tensor, *, sampler: str = "ode", steps: int = 20, return_trajectory: bool = False,
               generator: torch.Generator | None = None, noise_level: float | None = None, output_latents: bool = False) -> Samples:
        """One sample per row of ``noise``; ``output_latents``: ``images`` holds the final latents
        (unscaled, as diffusers' ``output_type="latent"``) instead of decoded images."""
        ts = self.schedule_for(sampler, steps)
        n = noise.shape[0]
        if n % cond.batch_size:
            raise ValueError(f"noise batch {n} is not a multiple of the LR batch {cond.batch_size}")
        c = cond.repeat(n // cond.batch_size)
        stochastic = sampler != "ode"
        x = noise.to(self.device, torch.float32)
        traj = [x] if (return_trajectory or stochastic) else None
        logps = []
        for i in range(steps):
            x, lp, _, _ = self.sde_step(c, x, ts, i, generator=generator, noise_level=0.0 if sampler == "ode" else noise_level)
            if stochastic:
                logps.append(lp)
            if traj is not None:
                traj.append(x)
        img = x if output_latents else self._vae_decode(x / self.vae_scale)
        return Samples(images=img, trajectory=torch.stack(traj, 1) if traj is not None else None,
                       log_probs=torch.stack(logps, 1) if logps else None, sigmas=ts if traj is not None else None)

    def dsm(self, x0: Tensor, cond: Cond, t: Tensor, noise: Tensor, t_model: Tensor | None = None) -> Tensor:
        """Denoising loss per sample [B] in latent space (no guidance), ControlNet on LR↑: the
        model's output against its ``prediction_type`` target (ε, v, or x₀)."""
        n = x0.shape[0]
        c = cond.repeat(n // cond.batch_size) if n != cond.batch_size else cond
        z0 = self._encode_clean(x0)
        ti = (t.to(self.device).reshape(-1).float() * 1000).round().clamp(0, 999).long()
        tm = ti if t_model is None else (t_model.to(self.device).reshape(-1).expand_as(t).float() * 1000).round().clamp(0, 999).long()
        a = self.alphas_cumprod[ti][:, None, None, None]
        eps = noise.to(self.device, torch.float32)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = self.schedule.target(z0, eps, a)
        return ((self._model_out(z_t, tm, c.features, guidance=1.0) - target) ** 2).flatten(1).mean(1)
