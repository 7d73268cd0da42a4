"""Loading local diffusers folders for the backends (never downloads)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..tiny import PolicyLoadError

log = logging.getLogger(__name__)

CONFIG_NAME = "sralign_policy.json"

#: weight precisions of the backends' ``dtype`` / ``vae_dtype`` settings
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` -> the torch dtype (a one-line error names the valid values)."""
    if name not in DTYPES:
        from ...config import ConfigError

        raise ConfigError(f"{key} must be one of {' | '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_precision(config) -> None:
    """Validate a backend config's ``dtype`` / ``vae_dtype`` strings (before any weight loads)."""
    for key in ("dtype", "vae_dtype"):
        torch_dtype(getattr(config, key), key)


def set_precision(frozen: nn.Module, dtype: torch.dtype) -> None:
    """Store ``frozen``'s weights in ``dtype`` and its trainable parameters (LoRA) in fp32."""
    if any(p.dtype != dtype for p in frozen.parameters() if not p.requires_grad):
        frozen.to(dtype)  # (diffusers warns on every .to(dtype), so only when something changes)
    for p in frozen.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def enable_checkpointing(*modules: nn.Module | None) -> None:
    """diffusers' gradient checkpointing on every given model that supports it (recomputes each
    block's activations in the backward pass; active only while gradients are recorded)."""
    for m in modules:
        if m is not None and getattr(m, "_supports_gradient_checkpointing", False):
            m.enable_gradient_checkpointing()


def param_bytes(module: nn.Module, trainable: bool | None = None) -> int:
    """Bytes held by ``module``'s parameters as stored (all; or only trainable / only frozen)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


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


def load_component(cls, folder: Path, sub: str, dtype: torch.dtype | None = None):
    """``cls`` from ``folder/sub`` (no download), its weights loaded straight into ``dtype``
    (None: as diffusers defaults, fp32) so a bf16 model never exists in fp32 in memory."""
    try:
        return cls.from_pretrained(folder, subfolder=sub, local_files_only=True, **({} if dtype is None else {"torch_dtype": dtype}))
    except OSError as e:
        raise PolicyLoadError(f"could not load {sub}/ from {folder}: {str(e).splitlines()[0]}") from None


def load_ddpm_scheduler(folder: Path):
    """The folder's DDPM scheduler, or SD's default schedule (scaled-linear 0.00085–0.012)."""
    from diffusers import DDPMScheduler

    if (folder / "scheduler" / "scheduler_config.json").is_file():
        return DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class PromptEncoder:
    """Text embeddings of prompts with a model folder's own text encoder(s), loaded once, cached
    per prompt string. Nothing is downloaded.

    kind ``"clip"`` (SD 1.x/2.x): ``tokenizer/`` + ``text_encoder/`` -> {"prompt_embeds": [B,L,D]}.
    kind ``"flux"``: CLIP ``tokenizer/`` + ``text_encoder/`` gives the pooled vector and T5
    ``tokenizer_2/`` + ``text_encoder_2/`` the sequence -> {"prompt_embeds": [B,L,D],
    "pooled_prompt_embeds": [B,P]} (as diffusers' FluxPipeline encodes them).
    """

    SUBFOLDERS = {"clip": ("tokenizer", "text_encoder"), "flux": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}

    def __init__(self, folder: str | Path, kind: str = "clip", max_sequence_length: int = 512, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, CLIPTextModel

        self.folder, self.kind, self.device = Path(folder), kind, torch.device(device)
        missing = [s for s in self.SUBFOLDERS[kind] if not (self.folder / s).is_dir()]
        if missing:
            raise PolicyLoadError(f"{self.folder} has no {', '.join(m + '/' for m in missing)}: prompts need the model's "
                                  f"text encoder(s) ({', '.join(s + '/' for s in self.SUBFOLDERS[kind])})")
        load = dict(local_files_only=True, dtype=dtype)  # frozen: stored in the backend's weight dtype
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, subfolder="tokenizer", local_files_only=True)
            self.text_encoder = CLIPTextModel.from_pretrained(self.folder, subfolder="text_encoder", **load).eval().requires_grad_(False)
            if kind == "flux":
                from transformers import T5EncoderModel

                self.tokenizer_2 = AutoTokenizer.from_pretrained(self.folder, subfolder="tokenizer_2", local_files_only=True)
                self.text_encoder_2 = T5EncoderModel.from_pretrained(self.folder, subfolder="text_encoder_2", **load).eval().requires_grad_(False)
        except OSError as e:
            raise PolicyLoadError(f"could not load the text encoder from {self.folder}: {str(e).splitlines()[0]}") from None
        self.max_sequence_length = max_sequence_length
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def _ids(self, tok, text: str, max_length: int) -> torch.Tensor:
        return tok([text], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def _encode_one(self, text: str) -> dict[str, torch.Tensor]:
        clip_len = min(int(self.tokenizer.model_max_length), 77)
        clip = self.text_encoder(self._ids(self.tokenizer, text, clip_len))
        if self.kind == "clip":
            return {"prompt_embeds": clip.last_hidden_state[0].float()}
        t5_len = min(int(self.tokenizer_2.model_max_length), self.max_sequence_length)
        seq = self.text_encoder_2(self._ids(self.tokenizer_2, text, t5_len)).last_hidden_state[0]
        return {"prompt_embeds": seq.float(), "pooled_prompt_embeds": clip.pooler_output[0].float()}

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Embeddings of ``prompts`` stacked on the batch dimension (every row has the same length)."""
        rows = []
        for p in prompts:
            if p not in self._cache:
                self._cache[p] = self._encode_one(p)
            rows.append(self._cache[p])
        return {k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]}


def prompt_encoder_or_none(folder: Path, kind: str = "clip", **kw) -> PromptEncoder | None:
    """The folder's prompt encoder, or None if it has no text encoder (embeddings are zeros then)."""
    if not all((folder / s).is_dir() for s in PromptEncoder.SUBFOLDERS[kind]):
        return None
    return PromptEncoder(folder, kind, **kw)


ADD_TEXT_ENCODER = ("add the base model's tokenizer/ + text_encoder/ (for SD2.1-base one-step models: "
                    "sralign convert gdpo-sr FOLDER --base SD21_BASE --out DIR)")


def check_text_source(folder: Path, encoder: PromptEncoder | None, prompts: dict[str, str], fallback: str = "",
                      need: str = "tokenizer/ + text_encoder/", how: str = ADD_TEXT_ENCODER) -> None:
    """A model folder without a text encoder gets zero text embeddings. That is refused while a
    prompt is configured (``prompts``: config key -> text), and warned about otherwise: the
    authors encode even the empty prompt, so zeros give other images than theirs.
    ``fallback``: a precomputed source that replaces the encoder (nothing to check then);
    ``need``: the folders it lacks; ``how``: how to add them."""
    if encoder is not None or fallback:
        return
    set_ = {k: v for k, v in prompts.items() if v}
    if set_:
        k, v = next(iter(set_.items()))
        raise PolicyLoadError(f"{k}={v!r} is configured but {folder} has no {need} to encode it: {how}, or set {k}=''")
    log.warning("%s has no %s: the model gets zero text embeddings, not the encoded empty prompt "
                "the authors feed, so images differ from theirs; %s", folder, need, how)


def check_prompts(prompts: list[str] | None, batch: int, encoder: PromptEncoder | None, where: str) -> None:
    if prompts is None:
        return
    if isinstance(prompts, str) or len(prompts) != batch:
        raise ValueError(f"prompts: give one string per LR image (a list of {batch}), got {prompts!r:.80}")
    if encoder is None:
        raise ValueError(f"per-image prompts need a text encoder, and the model folder {where} has none "
                         "(add tokenizer/ + text_encoder/, or drop the prompts)")


def rows_of(features: dict[str, torch.Tensor], key: str, default: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row text conditioning for ``n`` rows: the Cond's own (repeated to n rows) or the
    policy's global embedding expanded."""
    if key in features:
        v = features[key]
        return v.repeat_interleave(n // v.shape[0], 0) if v.shape[0] != n else v
    return default.expand(n, *default.shape[1:])
