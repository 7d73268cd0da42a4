"""FLUX ControlNet SR (DP²O-SR's C-FLUX): a flow-matching FLUX transformer steered by a FLUX
ControlNet that sees the VAE latents of the upsampled LR; Euler ``ode`` and Flow-GRPO ``sde``
sampling (per-step log-probs), guidance embedding, peft LoRA on the transformer (optionally on
the ControlNet). ``reference()`` disables the adapters.

The σ grid is FluxPipeline's: ``linspace(1, 1/S, S)`` shifted by the folder's
``scheduler/scheduler_config.json`` (``FlowMatchEulerDiscreteScheduler``: with
``use_dynamic_shifting`` μ from the image token count, else the static ``shift``; 1 = unshifted),
then 0. Without a scheduler config, FLUX.1-dev's (dynamic shifting) applies. The transformer
takes the guidance embedding when its config has ``guidance_embeds``, the ControlNet when its
own config has. The ControlNet's latent of the LR↑ is the VAE posterior's mode
(``control_latent="mode"``) or a draw from it (``"sample"``, as the pipeline does).

Folder layout (local, ``local_files_only``): ``vae/``, ``transformer/``, ``controlnet/``,
optional ``scheduler/``;
text conditioning: with ``tokenizer/`` + ``text_encoder/`` (CLIP-L, pooled vector) and
``tokenizer_2/`` + ``text_encoder_2/`` (T5, token sequence) the config's prompt and per-image
prompts are encoded as FluxPipeline does (T5 length ``max_sequence_length``); without them,
precomputed embeddings (``prompt_embeds.safetensors`` with ``prompt_embeds`` [1,L,D] and
``pooled_prompt_embeds`` [1,P]) or zeros. The text encoders stay on the CPU; each distinct
prompt is encoded once and cached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ...config import ranged
from ..base import Cond, Samples
from ..flow import flow_sde_step
from ..tiny import PolicyLoadError
from .loading import DTYPES, PromptEncoder, check_model_folder, check_precision, check_text_source, load_component, prompt_encoder_or_none, rows_of, torch_dtype
from .lora import LoraPolicyMixin
from .presets import Preset
from .sd_schedule import quiet_from_config
from .upsample import UPSAMPLERS, upsample

# FLUX.1-dev's scheduler/scheduler_config.json: what a folder without scheduler/ gets
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096)


def read_flow_scheduler(folder: Path | None):
    """The folder's ``FlowMatchEulerDiscreteScheduler`` (FLUX.1-dev's without one, or for None)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    f = Path(folder or "") / "scheduler" / "scheduler_config.json"
    try:
        cfg = json.loads(f.read_text()) if folder is not None and f.is_file() else dict(FLUX_DEV_SCHEDULER)
    except json.JSONDecodeError as e:
        raise PolicyLoadError(f"{f} is not valid JSON ({e})") from None
    return quiet_from_config(FlowMatchEulerDiscreteScheduler, cfg)


def flux_mu(tokens: int, config) -> float:
    """FluxPipeline's μ for ``tokens`` packed image tokens: linear from (base_image_seq_len,
    base_shift) to (max_image_seq_len, max_shift)."""
    get = config.get if isinstance(config, dict) else lambda k, d: getattr(config, k, d)
    b0, b1 = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    s0, s1 = get("base_shift", 0.5), get("max_shift", 1.15)
    m = (s1 - s0) / (b1 - b0)
    return tokens * m + (s0 - m * b0)


@dataclass
class FluxControlNetConfig:
    scale: int = ranged(4, ge=1)
    guidance_scale: float = 2.5  # DP²O-SR C-FLUX (FLUX.1-dev's guidance embedding)
    controlnet_scale: float = 1.0
    sde_noise_level: float = ranged(0.7, ge=0)
    resize: str = ranged("bicubic", choices=UPSAMPLERS)  # LR upsampling before the VAE
    control_latent: str = ranged("mode", choices=("mode", "sample"))  # the VAE posterior of LR↑: mode or a draw
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_on_controlnet: bool = False
    prompt: str = ""
    max_sequence_length: int = 512  # T5 tokens (FLUX.1-dev 512, schnell 256)
    dtype: str = ranged("fp32", choices=tuple(DTYPES))  # frozen transformer/ControlNet/text weights; LoRA stays fp32
    vae_dtype: str = ranged("fp32", choices=tuple(DTYPES))
    gradient_checkpointing: bool = True


PRESETS = {
    "c-flux": Preset(
        backend="flux", paper="DP²O-SR C-FLUX / DP²O-FLUX (test_flux_controlnet.py)",
        config=dict(guidance_scale=2.5, controlnet_scale=1.0, resize="pil-bicubic", control_latent="sample", dtype="fp16",
                    vae_dtype="fp32"),
        sampler="ode", steps=25, colorfix="adain", prompt_template="{tags}",
        notes="FluxControlNetPipeline, FLUX.1-dev's scheduler (dynamic shift); prompt = RAM/DAPE tags"),
}


class _FluxModules(nn.Module):
    def __init__(self, vae, transformer, controlnet):
        super().__init__()
        self.vae, self.unet, self.controlnet = vae, transformer, controlnet  # ``unet``: the trained backbone


def pack(z: Tensor) -> Tensor:
    """[B,C,H,W] latents -> [B,(H/2)(W/2),4C] 2×2 patches (FLUX's packing)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device) -> Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


class FluxControlNet(LoraPolicyMixin):
    """Flow-matching FLUX ControlNet SR policy (samplers ``ode`` and ``sde``). The policy's space
    is the packed latent sequence [B, tokens, 4C]."""

    kind = "flux_controlnet"

    def __init__(self, vae, transformer, controlnet, config: FluxControlNetConfig | None = None,
                 prompt_embeds: Tensor | None = None, pooled: Tensor | None = None, base_path: str | None = None,
                 device: str | torch.device = "cpu", prompt_encoder: PromptEncoder | None = None, scheduler=None):
        self._setup(config or FluxControlNetConfig(), device, base_path, prompt_encoder, vae=vae, trained=transformer, controlnet=controlnet)
        self.model = _FluxModules(vae, transformer, controlnet).to(self.device)
        tc = transformer.config
        self.prompt_embeds = (prompt_embeds if prompt_embeds is not None else torch.zeros(1, 1, tc.joint_attention_dim)).to(self.device)
        self.pooled = (pooled if pooled is not None else torch.zeros(1, tc.pooled_projection_dim)).to(self.device)
        self.vae_scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.vae_shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
        self.scheduler = scheduler if scheduler is not None else read_flow_scheduler(None)

    @classmethod
    def from_pretrained(cls, path, config: FluxControlNetConfig | None = None, device: str = "cpu") -> "FluxControlNet":
        from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel

        folder = Path(path)
        saved = cls._from_saved(folder, FluxControlNetConfig, device)
        if saved is not None:
            return saved
        config = config or FluxControlNetConfig()
        check_precision(config)
        check_model_folder(folder, ("vae", "transformer", "controlnet"))
        wd = torch_dtype(config.dtype)
        vae = load_component(AutoencoderKL, folder, "vae", torch_dtype(config.vae_dtype))
        tr = load_component(FluxTransformer2DModel, folder, "transformer", wd)
        cn = load_component(FluxControlNetModel, folder, "controlnet", wd)
        pe = pooled = None
        enc = prompt_encoder_or_none(folder, "flux", max_sequence_length=config.max_sequence_length, dtype=wd)
        emb = folder / "prompt_embeds.safetensors"
        check_text_source(folder, enc, {"prompt": config.prompt}, fallback=str(emb) if emb.is_file() else "",
                          need="tokenizer/ text_encoder/ tokenizer_2/ text_encoder_2/ (nor prompt_embeds.safetensors)",
                          how="add FLUX.1-dev's CLIP and T5 text encoders and tokenizers (symlinks will do)")
        if enc is not None:
            d = enc([config.prompt])
            pe, pooled = d["prompt_embeds"], d["pooled_prompt_embeds"]
        elif emb.is_file():
            from safetensors.torch import load_file

            d = load_file(str(emb))
            pe, pooled = d["prompt_embeds"], d["pooled_prompt_embeds"]
        return cls(vae, tr, cn, config, pe, pooled, base_path=str(folder.resolve()), device=device, prompt_encoder=enc,
                   scheduler=read_flow_scheduler(folder))

    def _lora_modules(self) -> dict[str, nn.Module]:
        mods = {"transformer": self.model.unet}
        if self.config.lora_on_controlnet:
            mods["controlnet"] = self.model.controlnet
        return mods

    def to(self, device) -> "FluxControlNet":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.prompt_embeds, self.pooled = self.prompt_embeds.to(self.device), self.pooled.to(self.device)
        self._place_prompt_encoder()
        return self

    # ------------------------------------------------------------------ latents
    def _factor(self) -> int:
        return 2 ** (len(self.model.vae.config.block_out_channels) - 1)

    def _encode(self, img01: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """VAE latents (shifted, scaled): the posterior's mode, or a draw from it with ``generator``."""
        if generator is None:
            z = self._vae_encode(img01)
        else:
            with torch.no_grad():
                z = self.model.vae.encode((img01 * 2 - 1).to(self.vae_dtype)).latent_dist.sample(generator).float()
        return (z - self.vae_shift) * self.vae_scale

    def _decode(self, x: Tensor, h: int, w: int) -> Tensor:
        return self._vae_decode(unpack(x, h, w) / self.vae_scale + self.vae_shift)

    def _latent_hw(self, img: Tensor) -> tuple[int, int]:
        f = self._factor()
        return img.shape[-2] // f, img.shape[-1] // f

    # ------------------------------------------------------------------ the contract
    def condition(self, lr: Tensor, prompts: list[str] | None = None, generator: torch.Generator | None = None) -> Cond:
        """Encode LR [B,3,h,w]; ``prompts`` (one per image) replace the config's prompt for these rows.
        With ``control_latent="sample"`` the posterior draw uses ``generator`` (default: seeded 0)."""
        text = self._text_features(prompts, lr.shape[0])  # checked before any encoding
        lr = lr.to(self.device, torch.float32)
        lr_up = upsample(lr, self.scale, self.config.resize)
        if self.config.control_latent == "sample" and generator is None:
            generator = torch.Generator(self.device).manual_seed(0)
        feats = {"control": pack(self._encode(lr_up, generator if self.config.control_latent == "sample" else None)), **text}
        return Cond(lr=lr, lr_up=lr_up, features=feats)

    def noise_shape(self, cond: Cond, group: int = 1) -> tuple[int, ...]:
        b, t, d = cond.features["control"].shape
        return (b * group, t, d)

    def noise_layout(self) -> tuple[int, int, int]:
        f = self._factor()
        return self.model.vae.config.latent_channels, f, 2 * f  # packing takes 2×2 latent patches

    def pack_noise(self, spatial: Tensor) -> Tensor:
        return pack(spatial)

    def dsm_noise_shape(self, x0: Tensor) -> tuple[int, ...]:
        h, w = self._latent_hw(x0)
        return (x0.shape[0], (h // 2) * (w // 2), self.model.vae.config.latent_channels * 4)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond, h: int, w: int) -> Tensor:
        n = x.shape[0]
        t = sigma.reshape(-1).expand(n).to(self.device, torch.float32)
        text = rows_of(cond.features, "prompt_embeds", self.prompt_embeds, n)
        pooled = rows_of(cond.features, "pooled_prompt_embeds", self.pooled, n)
        ids, txt_ids = image_ids(h, w, self.device), torch.zeros(text.shape[1], 3, device=self.device)
        kw = dict(encoder_hidden_states=self._w(text), pooled_projections=self._w(pooled),
                  timestep=self._w(t), img_ids=ids, txt_ids=txt_ids)
        g = torch.full((n,), self.config.guidance_scale, device=self.device, dtype=self.weight_dtype)
        tr, cn = self.model.unet, self.model.controlnet
        x = self._w(x)
        # each network takes the guidance embedding only if its own config has one (as FluxControlNetPipeline)
        blocks, single = cn(x, controlnet_cond=self._w(cond.features["control"]), conditioning_scale=self.config.controlnet_scale,
                            guidance=g if cn.config.guidance_embeds else None, return_dict=False, **kw)
        return tr(x, controlnet_block_samples=blocks, controlnet_single_block_samples=single,
                  guidance=g if tr.config.guidance_embeds else None, return_dict=False, **kw)[0].float()

    def sigmas(self, steps: int, tokens: int) -> Tensor:
        """FluxPipeline's σ grid [steps+1] (1 … 0) for ``tokens`` packed image tokens."""
        if steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {steps}")
        sch = self.scheduler
        mu = flux_mu(tokens, sch.config) if sch.config.use_dynamic_shifting else None
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return sch.sigmas.to(self.device, torch.float32)

    def sde_step(self, cond: Cond, x: Tensor, sigmas: Tensor, i: int, *, prev_sample: Tensor | None = None,
                 generator: torch.Generator | None = None, noise_level: float | None = None):
        h, w = self._latent_hw(cond.lr_up)
        eta = self.config.sde_noise_level if noise_level is None else noise_level
        return flow_sde_step(x, self.velocity(x, sigmas[i], cond, h, w), sigmas, i, eta, prev_sample, generator)

    def sample(self, cond: Cond, noise: Tensor, *, sampler: str = "ode", steps: int = 25, return_trajectory: bool = False,
               generator: torch.Generator | None = None, noise_level: float | None = None, output_latents: bool = False) -> Samples:
        """One sample per row of ``noise``; ``output_latents``: ``images`` holds the final packed
        latents (as diffusers' ``output_type="latent"``) instead of decoded images."""
        if sampler not in ("ode", "sde"):
            raise ValueError(f"FluxControlNet samples with 'ode' or 'sde' (got {sampler!r})")
        n = noise.shape[0]
        if n % cond.batch_size:
            raise ValueError(f"noise batch {n} is not a multiple of the LR batch {cond.batch_size}")
        c = cond.repeat(n // cond.batch_size)
        h, w = self._latent_hw(cond.lr_up)
        sig = self.sigmas(steps, noise.shape[1])
        x = noise.to(self.device, torch.float32)
        traj = [x] if (return_trajectory or sampler == "sde") else None
        logps = []
        for i in range(steps):
            if sampler == "ode":
                x = x + (sig[i + 1] - sig[i]) * self.velocity(x, sig[i], c, h, w)
            else:
                x, lp, _, _ = self.sde_step(c, x, sig, i, generator=generator, noise_level=noise_level)
                logps.append(lp)
            if traj is not None:
                traj.append(x)
        return Samples(images=x if output_latents else self._decode(x, h, w), trajectory=torch.stack(traj, 1) if traj is not None else None,
                       log_probs=torch.stack(logps, 1) if logps else None, sigmas=sig if traj is not None else None)

    def dsm(self, x0: Tensor, cond: Cond, t: Tensor, noise: Tensor, t_model: Tensor | None = None) -> Tensor:
        """Flow-matching velocity loss per sample [B] on packed latents."""
        n = x0.shape[0]
        c = cond.repeat(n // cond.batch_size) if n != cond.batch_size else cond
        h, w = self._latent_hw(x0)
        z0 = pack(self._encode_clean(x0))
        t = t.to(self.device).reshape(-1).float()
        tm = t if t_model is None else t_model.to(self.device).reshape(-1).expand_as(t).float()
        eps = noise.to(self.device, torch.float32)
        x_t = (1 - t)[:, None, None] * z0 + t[:, None, None] * eps
        return ((self.velocity(x_t, tm, c, h, w) - (eps - z0)) ** 2).flatten(1).mean(1)
