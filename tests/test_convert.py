"""``sralign convert``: the published checkpoint layouts (tiny random weights written with the key
names the authors' code produces) load strictly and equal the same weights loaded through
diffusers directly; bad files give one clear error and write nothing."""

import os
import subprocess
import sys

import pytest
import torch

from diffusers_helpers import FLUX_TINY, _give_voice, tiny_vae, tiny_vae8, write_osediff_pkl, write_sd_base
from sralign.policies.diffusers import ControlNetSD, ControlNetSDConfig, FluxControlNet, FluxControlNetConfig, OneStepSD, OneStepSDConfig
from sralign.policies.diffusers.convert import ConvertError, convert
from sralign.policies.tiny import PolicyLoadError


def _tree(folder):
    """Every path under ``folder`` with its size and mtime (to show a folder was not modified)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _assert_nothing_written(out):
    assert not out.exists()
    assert not out.parent.exists() or not [p for p in out.parent.iterdir() if ".sralign-convert-" in p.name]


# ----------------------------------------------------------------------------- C-SD2
@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """An SD2-base-like folder (factor-8 VAE) and a C-SD2 ``model.safetensors`` laid out as
    ``ControlNetModel.from_unet(unet)`` with default settings, then trained (random weights)."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sd2")
    base = root / "sd2-base"
    write_sd_base(base, vae=tiny_vae8())
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    cn = ControlNetModel.from_unet(unet)
    _give_voice(cn)
    with torch.no_grad():  # a trained ControlNet: its zero-initialised output convolutions speak up
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(0.3 * torch.randn_like(p))
    save_file(cn.state_dict(), str(root / "model.safetensors"))
    return base, root / "model.safetensors", cn.state_dict()


def _direct_controlnet_sd(base, weights):
    """The authors' loading: from_unet on the base UNet, then a strict load_state_dict."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from safetensors.torch import load_file

    from sralign.policies.diffusers.loading import load_ddpm_scheduler

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    cn = ControlNetModel.from_unet(unet)
    cn.load_state_dict(load_file(str(weights)), strict=True)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    return ControlNetSD(vae, unet, cn, load_ddpm_scheduler(base))


def test_sd_controlnet_converts_and_equals_the_direct_load(sd2, tmp_path):
    base, src, state = sd2
    before = _tree(base)
    out = convert("sd-controlnet", src, base, tmp_path / "c-sd2")
    assert (out / "controlnet" / "config.json").is_file() and (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "unet").is_symlink() and (out / "text_encoder").is_symlink() and (out / "scheduler").is_symlink()
    assert _tree(base) == before  # --base untouched
    pol = ControlNetSD.from_pretrained(out)
    got = pol.model.controlnet.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    ref = _direct_controlnet_sd(base, src)
    ref.prompt_embeds = pol.prompt_embeds  # same text conditioning (the encoded empty prompt)
    cond = pol.condition(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    noise = torch.randn(pol.noise_shape(cond), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = pol.sample(cond, noise, steps=2).images
        b = ref.sample(ref.condition(cond.lr), noise, steps=2).images
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b)


def test_converted_controlnet_sees_the_lr_and_a_folder_without_one_is_refused(sd2, tmp_path):
    """Regression (issue 13): a folder without controlnet/ silently got a fresh zero-output ControlNet
    and ignored the LR. Now: the converted model's output depends on the LR; no ControlNet = error."""
    base, src, _ = sd2
    out = convert("sd-controlnet", src, base, tmp_path / "c-sd2")
    pol = ControlNetSD.from_pretrained(out)
    g = torch.Generator().manual_seed(0)
    lr1, lr2 = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    c1, c2 = pol.condition(lr1), pol.condition(lr2)
    noise = torch.randn(pol.noise_shape(c1), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = pol.sample(c1, noise, steps=2).images, pol.sample(c2, noise, steps=2).images
    assert (a - b).abs().mean() > 1e-5  # measured 6.6e-5 (a random tiny UNet barely listens; fp32 noise is ~1e-7)
    fresh = ControlNetSD.from_pretrained(base, ControlNetSDConfig(fresh_controlnet=True))  # training from scratch: asked for
    with torch.no_grad():  # what the silent fallback did: a fresh ControlNet's zero outputs ignore the LR
        fa, fb = fresh.sample(fresh.condition(lr1), noise, steps=2).images, fresh.sample(fresh.condition(lr2), noise, steps=2).images
    assert torch.equal(fa, fb)
    with pytest.raises(PolicyLoadError, match=r"has no controlnet/.*sralign convert sd-controlnet model.safetensors --base"):
        ControlNetSD.from_pretrained(base)
    from sralign.cli import main

    assert main(["sr", str(_png(tmp_path)), str(tmp_path / "sr.png"), "--policy", "controlnet-sd", "--model-path", str(base)]) == 2
    assert not (tmp_path / "sr.png").exists()


def _png(tmp_path):
    from sralign.data.images import save_image

    f = tmp_path / "lr.png"
    save_image(torch.rand(3, 16, 16), f)
    return f


def test_copy_makes_a_self_contained_folder(sd2, tmp_path):
    base, src, _ = sd2
    out = convert("sd-controlnet", src, base, tmp_path / "c-sd2", copy=True)
    assert not any(p.is_symlink() for p in out.rglob("*")) and (out / "unet" / "config.json").is_file()
    assert isinstance(ControlNetSD.from_pretrained(out), ControlNetSD)


def _bad_sd_file(kind, sd2, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    base, _, state = sd2
    state = dict(state)
    if kind == "missing":
        del state["controlnet_mid_block.weight"]
    elif kind == "extra":
        state["controlnet_extra.weight"] = torch.zeros(2)
    elif kind == "shape":
        state["controlnet_mid_block.bias"] = torch.zeros(3)
    elif kind == "layers":  # a ControlNet made from a UNet with two resnets per block
        unet = UNet2DConditionModel.from_config(dict(UNet2DConditionModel.load_config(base, subfolder="unet"), layers_per_block=2))
        state = ControlNetModel.from_unet(unet).state_dict()
    elif kind == "object":  # a full pickle: would run code on load
        f = tmp_path / "model.pth"
        torch.save({"conv_in.weight": torch.zeros(1), "meta": _Obj()}, f)
        return f
    elif kind == "string":  # a pickle weights_only accepts, but not a state dict
        f = tmp_path / "model.pth"
        torch.save({**state, "conv_in.weight": "oops"}, f)
        return f
    f = tmp_path / "model.safetensors"
    save_file(state, str(f))
    return f


class _Obj:
    pass


@pytest.mark.parametrize("kind,message", [
    ("missing", r"lacks 1 key\(s\) that ControlNetModel.from_unet\(.*\) needs: controlnet_mid_block.weight"),
    ("extra", r"has 1 unexpected key\(s\) that .* does not have: controlnet_extra.weight"),
    ("shape", r"controlnet_mid_block.bias has shape \[3\] where .* has \[32\]"),
    ("layers", r"wrong layer count: .* has 6 controlnet_down_blocks \(indices 0-5\) where .* has 4; the ControlNet was made from another UNet"),
    ("object", r"holds a Python object other than tensors.*weights_only=True"),
    ("string", r"entry 'conv_in.weight' is a str, not a tensor"),
])
def test_sd_controlnet_bad_files_are_refused_and_nothing_is_written(sd2, tmp_path, kind, message):
    src = _bad_sd_file(kind, sd2, tmp_path)
    out = tmp_path / "out" / "c-sd2"
    with pytest.raises(ConvertError, match=message) as e:
        convert("sd-controlnet", src, sd2[0], out)
    assert "\n" not in str(e.value)
    _assert_nothing_written(out)


def test_cli_convert_errors_are_one_line(sd2, tmp_path, capsys):
    from sralign.cli import main

    base, src, _ = sd2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    for args, msg in ((["sd-controlnet", str(src), "--base", str(base), "--out", str(tmp_path / "busy")], "exists and is not empty"),
                      (["sd-controlnet", str(src), "--base", str(base), "--out", str(base / "sub")], "is inside --base"),
                      (["sd-controlnet", str(tmp_path / "nope.safetensors"), "--base", str(base), "--out", str(tmp_path / "o")], "no such file"),
                      (["osediff", str(src), "--base", str(base), "--out", str(tmp_path / "o")], "is not an OSEDiff checkpoint")):
        capsys.readouterr()
        assert main(["convert", *args]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not (base / "sub").exists() and not (tmp_path / "o").exists() and os.listdir(tmp_path / "busy") == ["f"]
    r = subprocess.run([sys.executable, "-m", "sralign.cli", "convert", "sd-controlnet", str(src), "--base", str(base), "--out",
                        str(tmp_path / "ok")], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "ok" / "controlnet" / "config.json").is_file(), r.stderr


# ----------------------------------------------------------------------------- C-FLUX
@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny FLUX folder and a C-FLUX state dict laid out as
    ``FluxControlNetModel.from_transformer(transformer, num_layers=2, num_single_layers=1)``."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("flux")
    base = root / "flux-dev"
    torch.manual_seed(0)
    tiny_vae().save_pretrained(base / "vae")
    tr = FluxTransformer2DModel(**FLUX_TINY)
    tr.save_pretrained(base / "transformer")
    cn = FluxControlNetModel.from_transformer(tr, num_layers=2, num_single_layers=1, attention_head_dim=tr.config.attention_head_dim,
                                              num_attention_heads=tr.config.num_attention_heads)
    _give_voice(cn)
    save_file(cn.state_dict(), str(root / "model.safetensors"))
    return base, root / "model.safetensors", tr, cn


def test_flux_controlnet_converts_and_equals_the_direct_load(flux, tmp_path):
    base, src, tr, cn = flux
    out = convert("flux-controlnet", src, base, tmp_path / "c-flux", num_layers=2, num_single_layers=1)
    pol = FluxControlNet.from_pretrained(out)
    got = pol.model.controlnet.state_dict()
    assert got.keys() == cn.state_dict().keys() and all(torch.equal(got[k], v) for k, v in cn.state_dict().items())
    from diffusers import AutoencoderKL

    ref = FluxControlNet(AutoencoderKL.from_pretrained(base, subfolder="vae"), tr, cn)
    cond = pol.condition(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    noise = torch.randn(pol.noise_shape(cond), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = pol.sample(cond, noise, steps=2).images
        b = ref.sample(ref.condition(cond.lr), noise, steps=2).images
    assert torch.equal(a, b)
    with pytest.raises(PolicyLoadError, match=r"prompt='a photo' is configured but .* has no tokenizer/ text_encoder/ tokenizer_2/"):
        FluxControlNet.from_pretrained(out, FluxControlNetConfig(prompt="a photo"))  # no silent zero embeddings


def test_flux_controlnet_wrong_layer_count_is_named(flux, tmp_path):
    base, src, _, _ = flux
    out = tmp_path / "c-flux"
    with pytest.raises(ConvertError, match=r"wrong layer count: .* has 2 transformer_blocks, --num-layers says 4; .*"
                                           r"pass --num-layers 2 --num-single-layers 1"):
        convert("flux-controlnet", src, base, out)  # DP²O-SR's defaults (4, 0) do not fit this file
    with pytest.raises(ConvertError, match=r"has 1 single_transformer_blocks, --num-single-layers says 0"):
        convert("flux-controlnet", src, base, out, num_layers=2, num_single_layers=0)
    _assert_nothing_written(out)


# ----------------------------------------------------------------------------- OSEDiff
@pytest.fixture(scope="module")
def osediff(tmp_path_factory):
    root = tmp_path_factory.mktemp("osediff")
    base = root / "sd21-base"
    write_sd_base(base)
    unet, vae = write_osediff_pkl(base, root / "osediff.pkl")
    return base, root / "osediff.pkl", unet, vae


def _osediff_reference(unet, vae, lr_up, emb, alphas):
    """OSEDiff's forward on the adapter-carrying models (no noise, UNet at 999, x̂0 from ε)."""
    sf = vae.config.scaling_factor
    with torch.no_grad():
        z = vae.encode(lr_up * 2 - 1).latent_dist.mode() * sf
        eps = unet(z, torch.tensor([999]), encoder_hidden_states=emb.expand(z.shape[0], -1, -1)).sample
        a = alphas[999]
        x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
        return ((vae.decode(x0 / sf).sample + 1) / 2).clamp(0, 1)


def test_osediff_converts_merged_and_equals_the_adapter_model(osediff, tmp_path):
    from diffusers_helpers import encode_empty_prompt

    base, src, unet, vae = osediff
    before = _tree(base)
    out = convert("osediff", src, base, tmp_path / "osediff")
    assert _tree(base) == before
    assert not (out / "unet").is_symlink() and (out / "text_encoder").is_symlink()
    from safetensors.torch import load_file

    merged = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in merged)  # plain diffusers weights
    pol = OneStepSD.from_pretrained(out, OneStepSDConfig(t_noise=0.0, t_diff=0.999))
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = pol.condition(lr)
    with torch.no_grad():
        got = pol.sample(cond, torch.randn(pol.noise_shape(cond))).images
        with pol.reference():  # the merged OSEDiff is the reference of a policy trained on top
            ref_pol = pol.sample(cond, torch.randn(pol.noise_shape(cond))).images
    want = _osediff_reference(unet, vae, cond.lr_up, encode_empty_prompt(base), pol.alphas_cumprod)
    err = (got - want).abs().max().item()
    print(f"max |Δ| = {err:.1e}")
    assert err <= 1e-5, err
    assert torch.equal(got, ref_pol)
    unet.disable_adapters()
    try:  # the LoRA matters at this size: without it the output is another
        assert (want - _osediff_reference(unet, vae, cond.lr_up, encode_empty_prompt(base), pol.alphas_cumprod)).abs().max() > 1e-3
    finally:
        unet.enable_adapters()


def _bad_osediff(kind, osediff, tmp_path):
    base, src, _, _ = osediff
    ck = torch.load(src, weights_only=True)
    if kind == "missing":
        k = next(k for k in ck["state_dict_unet"] if "lora_A.default_decoder" in k)
        del ck["state_dict_unet"][k]
    elif kind == "extra":
        ck["state_dict_vae"]["decoder.conv_in.lora_A.default_decoder.weight"] = torch.zeros(1)
    elif kind == "field":
        ck["vae_lora_decoder_modules"] = ["decoder.conv_in"]
    elif kind == "layers":  # targets of a UNet with more blocks than the base's
        ck["unet_lora_encoder_modules"] = ck["unet_lora_encoder_modules"] + ["down_blocks.3.resnets.0.conv1"]
    elif kind == "rank":
        ck["rank_unet"] = 8
    elif kind == "object":
        ck["args"] = _Obj()
    f = tmp_path / "bad.pkl"
    torch.save(ck, f)
    return base, f


@pytest.mark.parametrize("kind,message", [
    ("missing", r"state_dict_unet lacks 1 key\(s\) that .* needs: .*lora_A.default_decoder"),
    ("extra", r"state_dict_vae has 1 unexpected key\(s\) .*: decoder.conv_in.lora_A.default_decoder.weight"),
    ("field", r"has unexpected key\(s\) vae_lora_decoder_modules: not an OSEDiff checkpoint"),
    ("layers", r"wrong layer count: .* lists 1 LoRA target module\(s\) that .*unet does not have: down_blocks.3.resnets.0.conv1"),
    ("rank", r"lora_A.default_\w+.weight has shape \[4, .*\] where .* \(rank 8\) has \[8, "),
    ("object", r"holds a Python object other than tensors"),
])
def test_osediff_bad_files_are_refused_and_nothing_is_written(osediff, tmp_path, kind, message):
    base, src = _bad_osediff(kind, osediff, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=message) as e:
        convert("osediff", src, base, out)
    assert "\n" not in str(e.value)
    _assert_nothing_written(out)


# ----------------------------------------------------------------------------- GDPO-SR (merged folder)
def test_gdpo_sr_folder_gets_the_base_text_encoder(tmp_path):
    """A merged vae/ + unet/ folder without a text encoder: zeros would be fed (warned; refused
    with a prompt); converting adds SD2.1-base's text encoder, tokenizer and scheduler."""
    base, gdpo = tmp_path / "sd21", tmp_path / "GDPOSR"
    write_sd_base(base)
    write_sd_base(gdpo, text=False, seed=1)
    with pytest.raises(PolicyLoadError, match=r"prompt='a photo' is configured but .* has no tokenizer/ \+ text_encoder/.*sralign convert gdpo-sr"):
        OneStepSD.from_pretrained(gdpo, OneStepSDConfig(prompt="a photo"))
    out = convert("gdpo-sr", gdpo, base, tmp_path / "gdpo-sr")
    pol = OneStepSD.from_pretrained(out, OneStepSDConfig(prompt="a photo"))
    assert pol.prompt_encoder is not None and pol.prompt_embeds.abs().sum() > 0
    assert (out / "unet").resolve() == (gdpo / "unet").resolve() and (out / "scheduler").resolve() == (base / "scheduler").resolve()
    bad = tmp_path / "bad-base"
    write_sd_base(bad)
    import json

    cfg = json.loads((bad / "text_encoder" / "config.json").read_text())
    (bad / "text_encoder" / "config.json").write_text(json.dumps(dict(cfg, hidden_size=32)))
    with pytest.raises(ConvertError, match="text encoder has width 32 but .* expects 16"):
        convert("gdpo-sr", gdpo, bad, tmp_path / "o2")
    _assert_nothing_written(tmp_path / "o2")


def test_unknown_kind(tmp_path):
    with pytest.raises(ConvertError, match="unknown checkpoint kind 'lora'"):
        convert("lora", tmp_path, tmp_path, tmp_path / "o")
    assert os.listdir(tmp_path) == []
