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


class PromptEncoder:
    """Text embeddings of prompts with a model folder's own text encoder(s), loaded once, cached
    per prompt string. Nothing is downloaded.

    kind ``"clip"`` (SD 1.x/2.x): ``tokenizer/`` + ``text_encoder/`` -> {"prompt_embeds": [B,L,D]}.
    kind ``"flux"``: CLIP ``tokenizer/`` + ``text_encoder/`` gives the pooled vector and T5
    ``tokenizer_2/`` + ``text_encoder_2/`` the sequence -> {"prompt_embeds": [B,L,D],
    "pooled_prompt_embeds": [B,P]} (as diffusers' FluxPipeline encodes them).
    """

    SUBFOLDERS = {"clip": ("tokenizer", "text_encoder"), "flux": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}

    def __init__(self, folder: str | Path, kind: str = "clip", max_sequence_length: int = 512, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPTextModel

        self.folder, self.kind, self.device = Path(folder), kind, torch.device(device)
        missing = [s for s in self.SUBFOLDERS[kind] if not (self.folder / s).is_dir()]
        if missing:
            raise PolicyLoadError(f"{self.folder} has no {', '.join(m + '/' for m in missing)}: prompts need the model's "
                                  f"text encoder(s) ({', '.join(s + '/' for s in self.SUBFOLDERS[kind])})")
        load = dict(local_files_only=True)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, subfolder="tokenizer", **load)
            self.text_encoder = CLIPTextModel.from_pretrained(self.folder, subfolder="text_encoder", **load).eval().requires_grad_(False)
            if kind == "flux":
                from transformers import T5EncoderModel

                self.tokenizer_2 = AutoTokenizer.from_pretrained(self.folder, subfolder="tokenizer_2", **load)
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
