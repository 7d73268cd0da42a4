"""Where per-image prompts come from: a Python callable, or a local image-to-text model.

``load_prompt_source(spec)`` returns ``f(lr) -> list[str]`` for LR images ``lr`` [B,3,h,w] in
[0,1], one string per image:

- ``MODULE:FUNCTION`` (importable) or ``FILE.py:FUNCTION``: your own function with that contract,
  e.g. a wrapper around the RAM / DAPE taggers the papers use (README, "Your checkpoint").
- a folder: a transformers image-to-text model saved there (``save_pretrained`` of the model
  and its processor, e.g. BLIP or a ``VisionEncoderDecoderModel``), run with
  ``local_files_only``; nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

PromptSource = Callable[[Tensor], list[str]]


class PromptSourceError(ValueError):
    pass


def _from_callable(spec: str) -> PromptSource:
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            f = Path(mod_name)
            if not f.is_file():
                raise PromptSourceError(f"prompt source {spec}: no such file {f}")
            loader_spec = importlib.util.spec_from_file_location(f"sralign_prompt_source_{f.stem}", f)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise PromptSourceError(f"prompt source {spec}: cannot import {mod_name} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise PromptSourceError(f"prompt source {spec}: {mod_name} has no function {fn_name}")
    return _checked(fn, spec)


def _checked(fn: Callable, spec: str) -> PromptSource:
    def call(lr: Tensor) -> list[str]:
        out = fn(lr)
        if isinstance(out, str) or not isinstance(out, (list, tuple)) or len(out) != lr.shape[0] or not all(isinstance(s, str) for s in out):
            raise PromptSourceError(f"prompt source {spec} must return a list of {lr.shape[0]} strings (one per image), got {out!r:.80}")
        return [s.strip() for s in out]

    return call


def _from_model(folder: Path, max_new_tokens: int = 30) -> PromptSource:
    """A transformers image-to-text model (``AutoModelForImageTextToText``, else
    ``VisionEncoderDecoderModel``) with its processor (``AutoProcessor``, else an image
    processor + tokenizer), greedy decoding."""
    import transformers as tf

    load = dict(local_files_only=True)
    try:
        try:
            model = tf.AutoModelForImageTextToText.from_pretrained(folder, **load)
        except (ValueError, KeyError):
            model = tf.VisionEncoderDecoderModel.from_pretrained(folder, **load)
        processor = tf.AutoProcessor.from_pretrained(folder, **load)
        if isinstance(processor, tf.ProcessorMixin):  # image processor and tokenizer in one (BLIP, …)
            tokenizer = processor.tokenizer
            images_of = (lambda ims: processor(images=ims, return_tensors="pt"))
        else:
            image_processor, tokenizer = tf.AutoImageProcessor.from_pretrained(folder, **load), tf.AutoTokenizer.from_pretrained(folder, **load)
            images_of = (lambda ims: image_processor(images=ims, return_tensors="pt"))
    except OSError as e:
        raise PromptSourceError(f"prompt source {folder}: could not load an image-to-text model ({str(e).splitlines()[0]})") from None
    model.eval()

    @torch.no_grad()
    def caption(lr: Tensor) -> list[str]:
        from PIL import Image

        ims = [Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype("uint8")) for x in lr]
        inputs = images_of(ims)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    return _checked(caption, str(folder))


def load_prompt_source(spec: str) -> PromptSource:
    """The prompt source named by ``spec`` (see the module docstring); errors name the fix."""
    p = Path(spec)
    if p.is_dir():
        return _from_model(p)
    if ":" not in spec:
        raise PromptSourceError(f"prompt source {spec!r}: give MODULE:FUNCTION, FILE.py:FUNCTION or a local image-to-text model folder")
    return _from_callable(spec)
