"""The built-in tiny SR policy: a pixel-space conditional flow-matching denoiser (CPU-sized).

It diffuses the *residual* ``r = residual_scale · (HR − LR↑)`` (LR↑ = bicubic upsample), with
rectified-flow noising ``x_t = (1 − t)·r + t·ε`` and a velocity network ``v_θ ≈ ε − r``.
Working on the residual lets a ~1.5M-parameter UNet beat bicubic within minutes of CPU training;
the LR-derived estimate of the residual is 0, which is what the one-step mode noises.

Samplers (one network):
    ode       deterministic Euler integration of the flow from t=1 to t=0 (1…50 steps).
    sde       Flow-GRPO's SDE step with per-step Gaussian log-probs (for policy-gradient RL).
    onestep   GDPO-SR's noise-aware one-step mode: x_in = add_noise(0, ε, t_noise), one network
              call at the *unequal* timestep t_diff, x̂0 = x_in − t_diff·v̂.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import ranged
from .base import SAMPLERS, Cond, Samples
from .flow import flow_sde_step
from .unet import CondEncoder, TinyUNet, UNetConfig

DEFAULT_CHECKPOINT = "tiny_x4"


class PolicyLoadError(RuntimeError):
    """A checkpoint folder is missing a file or holds weights that do not fit the config."""


@dataclass
class TinyPolicyConfig:
    scale: int = ranged(4, ge=1)
    residual_scale: float = ranged(8.0, gt=0)
    t_noise: float = ranged(0.25, gt=0, le=1)  # one-step mode: noise level of the input (250 / 1000)
    t_diff: float = ranged(0.10, gt=0, le=1)  # one-step mode: timestep given to the network (100 / 1000)
    sde_noise_level: float = ranged(0.7, gt=0)  # Flow-GRPO's η
    ode_start: float = ranged(1.0, gt=0, le=1)  # ode/sde start at this noise level from start·ε (1 = pure noise)
    unet: UNetConfig = field(default_factory=UNetConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "TinyPolicyConfig":
        d = dict(d)
        u = d.pop("unet", {})
        if "channels" in u:
            u["channels"] = tuple(u["channels"])
        return cls(unet=UNetConfig(**u), **{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class _Net(nn.Module):
    def __init__(self, cfg: TinyPolicyConfig):
        super().__init__()
        self.encoder = CondEncoder(cfg.unet.cond_channels)
        self.unet = TinyUNet(cfg.unet)


def sigma_schedule(steps: int, device=None, start: float = 1.0) -> Tensor:
    """Noise levels [steps+1] from ``start`` down to 0 (uniform in t)."""
    if not 1 <= steps <= 1000:
        raise ValueError(f"steps must be in 1..1000, got {steps}")
    if not 0.0 < start <= 1.0:
        raise ValueError(f"start must be in (0, 1], got {start}")
    return torch.linspace(start, 0.0, steps + 1, device=device)


class TinyPolicy:
    """The embedded default SR policy (implements ``SRPolicy``).

    Args:
        config: architecture and sampler settings.
        device: torch device.

    Only the UNet is trainable during alignment; the LR encoder is frozen so that one
    ``Cond`` serves both the policy and the reference.
    """

    def __init__(self, config: TinyPolicyConfig | None = None, device: str | torch.device = "cpu"):
        self.config = config or TinyPolicyConfig()
        self.scale = self.config.scale
        self.device = torch.device(device)
        self.model = _Net(self.config).to(self.device)
        self._ref: _Net | None = None
        self._active = self.model

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "TinyPolicy":
        """Load a checkpoint folder (``config.json`` + ``model.safetensors``); None = shipped default."""
        folder = Path(path) if path is not None else shipped_checkpoint_dir()
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise PolicyLoadError(
                f"no config.json in {folder}: a tiny-policy checkpoint folder holds config.json and "
                f"model.safetensors (make one with `sralign pretrain --out DIR`)"
            )
        cfg = json.loads(cfg_file.read_text())
        policy = cls(TinyPolicyConfig.from_dict(cfg.get("policy", cfg)), device=device)
        policy.load(folder)
        return policy

    def save(self, path: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` (and ``reference.safetensors`` when the
        frozen reference differs from the policy) atomically into folder ``path``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_save_tensors(self.model.state_dict(), folder / "model.safetensors")
        if self._ref is not None:
            _atomic_save_tensors(self._ref.state_dict(), folder / "reference.safetensors")
        cfg = {"type": "tiny", "policy": asdict(self.config)}
        tmp = folder / "config.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, folder / "config.json")

    def load(self, path: str | Path) -> None:
        folder = Path(path)
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise PolicyLoadError(f"missing weights file {weights.name} in {folder}")
        self._load_state(self.model, load_file(str(weights), device=str(self.device)), weights)
        ref_file = folder / "reference.safetensors"
        self._ref = None
        if ref_file.is_file():
            self._ref = _Net(self.config).to(self.device)
            self._load_state(self._ref, load_file(str(ref_file), device=str(self.device)), ref_file)
            self._ref.requires_grad_(False).eval()
        self._active = self.model

    @staticmethod
    def _load_state(net: nn.Module, state: dict, where: Path) -> None:
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise PolicyLoadError(f"{where} does not fit the architecture in config.json: {first}") from None

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the policy weights: identifies the model that made a sample."""
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ training helpers
    def freeze_reference(self) -> None:
        """Snapshot the current weights as π_ref (called by trainers before alignment)."""
        self._ref = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.model.encoder.requires_grad_(False)

    @contextmanager
    def reference(self):
        """Inside: ``sample`` and ``dsm`` use the frozen reference (the initial weights)."""
        if self._ref is None:
            self.freeze_reference()
        prev, self._active = self._active, self._ref
        try:
            yield self
        finally:
            self._active = prev

    def reference_policy(self) -> "TinyPolicy":
        """A view of this policy whose ``sample`` / ``dsm`` use the frozen reference, sharing every
        network: entering its ``reference()`` or ``using()`` leaves this policy's active network
        alone, so a background thread can roll out π_ref while this one trains."""
        if self._ref is None:
            self.freeze_reference()
        view = copy.copy(self)
        view._active = self._ref
        return view

    @contextmanager
    def using(self, model: nn.Module):
        """Inside: ``sample``/``dsm`` use ``model`` (a copy of ``self.model``, e.g. an EMA)."""
        prev, self._active = self._active, model
        try:
            yield self
        finally:
            self._active = prev

    @property
    def dtype(self) -> torch.dtype:
        """The network's dtype (float32 as shipped; tests run it in float64): inputs are cast to it."""
        return next(self.model.unet.parameters()).dtype

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.model.unet.parameters())

    def all_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.model.parameters())

    def to(self, device: str | torch.device) -> "TinyPolicy":
        """Move the policy (and its reference) to ``device``."""
        self.device = torch.device(device)
        self.model.to(self.device)
        if self._ref is not None:
            self._ref.to(self.device)
        return self

    def train(self, mode: bool = True) -> "TinyPolicy":
        self.model.train(mode)
        return self

    # ------------------------------------------------------------------ the contract
    def condition(self, lr: Tensor) -> Cond:
        """Bicubic-upsample and encode LR [B,3,h,w] in [0,1] (once per LR, reused by a group)."""
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"lr must be [B,3,h,w], got {tuple(lr.shape)}")
        lr = lr.to(self.device, self.dtype)
        lr_up = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)
        feats = self.model.encoder(lr_up * 2 - 1)  # encoder is shared: frozen during alignment
        return Cond(lr=lr, lr_up=lr_up, features={"enc": feats})

    def noise_shape(self, cond: Cond, group: int = 1) -> tuple[int, int, int, int]:
        b, _, h, w = cond.lr_up.shape
        return (b * group, 3, h, w)

    def velocity(self, x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v_θ(x_t, t | LR) with the active network. x: [B,3,H,W]; t: [B] or scalar in [0,1]."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        feats = cond.features["enc"]
        m = 2 ** (len(self.config.unet.channels) - 1)  # works for a DDP-wrapped UNet too
        h, w = x.shape[-2:]
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            feats = F.pad(feats, (0, pw, 0, ph), mode="replicate")
        v = self._active.unet(x, t.to(x.device, x.dtype), feats)
        return v[..., :h, :w]

    def to_residual(self, x0: Tensor, cond: Cond) -> Tensor:
        """Image [B,3,H,W] in [0,1] -> the policy's space (scaled residual over LR↑)."""
        return self.config.residual_scale * (x0 - cond.lr_up)

    def to_image(self, r: Tensor, cond: Cond) -> Tensor:
        return (cond.lr_up + r / self.config.residual_scale).clamp(0, 1)

    def _expand(self, cond: Cond, n: int) -> Cond:
        if n % cond.batch_size:
            raise ValueError(f"noise batch {n} is not a multiple of the LR batch {cond.batch_size}")
        return cond.repeat(n // cond.batch_size)

    def sample(
        self,
        cond: Cond,
        noise: Tensor,
        *,
        sampler: str = "ode",
        steps: int = 20,
        return_trajectory: bool = False,
        generator: torch.Generator | None = None,
        noise_level: float | None = None,
    ) -> Samples:
        if sampler not in SAMPLERS or sampler == "ddpm":
            raise ValueError(f"unknown sampler {sampler!r} for the tiny policy; choose one of ode, sde, onestep")
        c = self._expand(cond, noise.shape[0])
        x = noise.to(self.device, self.dtype)
        if sampler == "onestep":
            r = self.onestep(x, c)
            return Samples(images=self.to_image(r, c))
        start = self.config.ode_start
        sig = sigma_schedule(steps, self.device, start)
        x = start * x  # the LR-derived estimate of the residual is 0: x_start = (1-start)·0 + start·ε
        traj = [x] if (return_trajectory or sampler == "sde") else None
        logps = []
        for i in range(steps):
            if sampler == "ode":
                v = self.velocity(x, sig[i], c)
                x = x + (sig[i + 1] - sig[i]) * v
            else:
                x, logp, _, _ = self.sde_step(c, x, sig, i, generator=generator, noise_level=noise_level)
                logps.append(logp)
            if traj is not None:
                traj.append(x)
        return Samples(
            images=self.to_image(x, c),
            trajectory=torch.stack(traj, dim=1) if traj is not None else None,
            log_probs=torch.stack(logps, dim=1) if logps else None,
            sigmas=sig if traj is not None else None,
        )

    def onestep(self, noise: Tensor, cond: Cond, t_noise: float | None = None, t_diff: float | None = None) -> Tensor:
        """Noise-aware one-step prediction of the residual (policy space). ``noise`` [B,3,H,W]."""
        tn = self.config.t_noise if t_noise is None else t_noise
        td = self.config.t_diff if t_diff is None else t_diff
        x_in = tn * noise  # add_noise(LR-derived estimate = 0, ε, t_noise)
        v = self.velocity(x_in, torch.tensor(td, device=self.device), cond)
        return x_in - td * v

    def sde_step(
        self,
        cond: Cond,
        x: Tensor,
        sigmas: Tensor,
        i: int,
        *,
        prev_sample: Tensor | None = None,
        generator: torch.Generator | None = None,
        noise_level: float | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One Flow-GRPO SDE step from ``sigmas[i]`` to ``sigmas[i+1]``.

        Returns (x_next [B,...], log_prob [B] (mean over dims), mean [B,...], std (scalar tensor)).
        With ``prev_sample`` given, scores that transition instead of drawing a new one.
        """
        eta = self.config.sde_noise_level if noise_level is None else noise_level
        v = self.velocity(x, sigmas[i], cond)
        return flow_sde_step(x, v, sigmas, i, eta, prev_sample=prev_sample, generator=generator)

    def dsm(
        self,
        x0: Tensor,
        cond: Cond,
        t: Tensor,
        noise: Tensor,
        t_model: Tensor | None = None,
        target: str = "x0",
        return_prediction: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Per-sample denoising loss [B] of images ``x0`` [B,3,H,W] in [0,1].

        Re-noise the residual r at ``t`` [B] with ``noise`` ε (x_t = (1 − t)·r + t·ε); the
        network is queried at ``t_model`` (default ``t``; GDPO-SR's unequal timestep passes
        t_diff here) and gives the velocity v̂. ``target`` picks what is measured:

            x0   mean((x_t − t_model·v̂ − r)²) / t_model²   the error of the one-step output
                 x̂0 = x_t − t_model·v̂, scaled; = mean((v̂ − (ε − r))²), the velocity error,
                 when t_model = t (DGPO's DSM)
            eps  mean((x_t + (1 − t_model)·v̂ − ε)²)        the error of the noise the network
                 implies, ε̂ = x_t + (1 − t_model)·v̂ — what GDPO-SR's code measures with its
                 ε-prediction UNet; = (1 − t)²·velocity error when t_model = t

        The two differ in more than scale when t_model ≠ t: x0 asks v̂ for (x_t − r)/t_model,
        eps for (ε − x_t)/(1 − t_model).

        With ``return_prediction`` also returns v̂ [B,3,H,W] (for DGPO's KL ‖v_θ − v_ref‖²).
        """
        if target not in ("x0", "eps"):
            raise ValueError(f"dsm target must be 'x0' or 'eps', got {target!r}")
        c = self._expand(cond, x0.shape[0])
        r = self.to_residual(x0.to(self.device, self.dtype), c)
        t = t.to(self.device, self.dtype).reshape(-1)
        tm = t if t_model is None else t_model.to(self.device, self.dtype).reshape(-1).expand_as(t)
        tb, tmb = t[:, None, None, None], tm[:, None, None, None]
        eps = noise.to(self.device, self.dtype)
        x_t = (1 - tb) * r + tb * eps
        v = self.velocity(x_t, tm, c)
        if target == "x0":
            loss = ((x_t - tmb * v - r) ** 2).flatten(1).mean(1) / tm**2
        else:
            loss = ((x_t + (1 - tmb) * v - eps) ** 2).flatten(1).mean(1)
        return (loss, v) if return_prediction else loss


def shipped_checkpoint_dir(name: str = DEFAULT_CHECKPOINT) -> Path:
    return Path(str(resources.files("sralign") / "assets" / name))


def _atomic_save_tensors(state: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
