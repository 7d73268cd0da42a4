"""Pluggable prompt sources: a Python callable, or a local transformers image-to-text model."""

import pytest
import torch

from diffusers_helpers import WORDS, write_tokenizer
from sralign.prompt_source import PromptSourceError, load_prompt_source


def test_callable_from_file_and_module(tmp_path, monkeypatch):
    f = tmp_path / "my_tags.py"
    f.write_text("def tags(lr):\n    return ['bright' if float(x.mean()) > 0.5 else 'dark' for x in lr]\n\n"
                 "def bad(lr):\n    return 'one string'\n")
    lr = torch.stack([torch.full((3, 4, 4), 0.9), torch.full((3, 4, 4), 0.1)])
    assert load_prompt_source(f"{f}:tags")(lr) == ["bright", "dark"]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_prompt_source("my_tags:tags")(lr[1:]) == ["dark"]
    with pytest.raises(PromptSourceError, match="list of 2 strings"):
        load_prompt_source(f"{f}:bad")(lr)
    with pytest.raises(PromptSourceError, match="no function nope"):
        load_prompt_source(f"{f}:nope")
    with pytest.raises(PromptSourceError, match="MODULE:FUNCTION"):
        load_prompt_source("just-a-name")


def test_local_image_to_text_model(tmp_path):
    """A tiny VisionEncoderDecoder captioner saved to a folder gives the captions its own
    generate() gives (greedy), one per image."""
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor

    torch.manual_seed(0)
    enc = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    dec = GPT2Config(vocab_size=len(WORDS) + 2, n_positions=64, n_embd=16, n_layer=1, n_head=2, add_cross_attention=True,
                     is_decoder=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 2, 0, 1
    model = VisionEncoderDecoderModel(cfg)
    for k, v in dict(decoder_start_token_id=2, pad_token_id=0, eos_token_id=1, bos_token_id=2).items():
        setattr(model.generation_config, k, v)
    model.save_pretrained(tmp_path / "cap")
    proc = ViTImageProcessor(size={"height": 16, "width": 16})
    proc.save_pretrained(tmp_path / "cap")
    write_tokenizer(tmp_path / "cap")
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    got = load_prompt_source(str(tmp_path / "cap"))(lr)

    from PIL import Image
    from transformers import AutoTokenizer

    ims = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")) for x in lr]
    with torch.no_grad():
        ids = model.eval().generate(**proc(images=ims, return_tensors="pt"), max_new_tokens=30, do_sample=False)
    want = [s.strip() for s in AutoTokenizer.from_pretrained(tmp_path / "cap").batch_decode(ids, skip_special_tokens=True)]
    assert got == want and len(got) == 2 and all(got)


def test_sr_prompt_source_and_preset_template(tmp_path):
    """sralign sr --prompt-source: the tags reach the model through the preset's template;
    IMG.txt beside the image wins over the source."""
    from diffusers_helpers import write_clip_text_encoder, write_tiny_controlnet_sd
    from sralign.cli import main
    from sralign.data.images import load_image, save_image

    model = tmp_path / "model"
    write_tiny_controlnet_sd(model)
    write_clip_text_encoder(model, hidden=16)
    (tmp_path / "tags.py").write_text("def cat(lr):\n    return ['a cat'] * len(lr)\n\ndef dog(lr):\n    return ['a dog'] * len(lr)\n")
    inp = tmp_path / "in"
    inp.mkdir()
    save_image(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)), inp / "img.png")

    def run(name, fn):
        out = tmp_path / name
        assert main(["sr", str(inp), str(out), "--preset", "c-sd2", "--model-path", str(model), "--steps", "2", "--dtype", "fp32",
                     "--quiet", "--prompt-source", f"{tmp_path / 'tags.py'}:{fn}"]) == 0
        return load_image(out / "img.png")

    cat, dog = run("cat", "cat"), run("dog", "dog")
    assert (cat - dog).abs().mean() > 1e-4
    (inp / "img.txt").write_text("a cat")
    assert torch.equal(run("sidecar", "dog"), cat)
