"""Weight dtype per component and gradient checkpointing of the diffusers backends (issue 14),
on tiny random models."""

import pytest
import torch

from diffusers_helpers import write_clip_text_encoder, write_sd_base, write_tiny_controlnet_sd, write_tiny_flux
from sralign.config import ConfigError, from_dict
from sralign.policies.diffusers import (ControlNetSD, ControlNetSDConfig, FluxControlNet, FluxControlNetConfig, OneStepSD,
                                        OneStepSDConfig)
from sralign.policies.diffusers.loading import param_bytes

BACKENDS = {"onestep": (OneStepSD, OneStepSDConfig), "controlnet": (ControlNetSD, ControlNetSDConfig),
            "flux": (FluxControlNet, FluxControlNetConfig)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_sd_base(root / "onestep")  # with a CLIP text encoder
    write_tiny_controlnet_sd(root / "controlnet")
    write_clip_text_encoder(root / "controlnet", 16)
    write_tiny_flux(root / "flux")
    return root


def _load(folders, kind, **cfg):
    cls, cfg_cls = BACKENDS[kind]
    return cls.from_pretrained(folders / kind, cfg_cls(**cfg))


def _inputs(pol, n_lr=1, group=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = pol.condition(torch.rand(n_lr, 3, 8, 8, generator=g))
    return cond, torch.randn(pol.noise_shape(cond, group), generator=g)


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_bf16_stores_frozen_weights_in_bf16_and_lora_in_fp32(folders, kind):
    pol = _load(folders, kind, dtype="bf16")
    names = dict(pol.model.named_parameters())
    lora = {n for n in names if "lora" in n}
    assert lora and {n for n, p in names.items() if p.requires_grad} == lora
    for n, p in names.items():
        want = torch.float32 if (n in lora or n.startswith("vae.")) else torch.bfloat16
        assert p.dtype == want, (n, p.dtype)
    assert all(p.dtype == torch.float32 for p in pol.trainable_parameters())
    if kind != "flux":
        assert pol.prompt_encoder.text_encoder.dtype == torch.bfloat16  # frozen too
    fp32 = _load(folders, kind)
    frozen16, frozen32 = param_bytes(pol.model.unet, trainable=False), param_bytes(fp32.model.unet, trainable=False)
    assert frozen16 * 2 == frozen32 and param_bytes(pol.model.unet, True) == param_bytes(fp32.model.unet, True)
    vae16 = _load(folders, kind, dtype="bf16", vae_dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in vae16.model.vae.parameters())


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_bf16_samples_finite_images_close_to_fp32_and_trains(folders, kind):
    """bf16 weights, fp32 VAE: images within 0.05 (max abs, on [0,1]) of fp32's; the DSM loss
    back-propagates fp32 gradients into the fp32 LoRA parameters."""
    out = {}
    for dtype in ("fp32", "bf16"):
        pol = _load(folders, kind, dtype=dtype)
        cond, noise = _inputs(pol)
        kw = {} if kind == "onestep" else {"steps": 2}
        with torch.no_grad():
            out[dtype] = pol.sample(cond, noise, **kw).images
    assert out["bf16"].dtype == torch.float32 and torch.isfinite(out["bf16"]).all()
    err = (out["bf16"] - out["fp32"]).abs().max().item()
    print(f"{kind}: bf16 vs fp32 max |Δ| = {err:.1e}")
    assert 0 < err <= 0.05, err
    x0 = torch.rand(2, 3, 32, 32)
    d = pol.dsm(x0, cond, torch.tensor([0.3, 0.6]), torch.randn(pol.dsm_noise_shape(x0)))
    assert d.dtype == torch.float32
    d.sum().backward()
    grads = [p.grad for p in pol.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _block_calls(pol, kind) -> list:
    """Counts calls of a block on the gradient's path (twice per step when checkpointed: the
    backward pass recomputes it; a pre-hook, as the recomputation stops once it has what it needs)."""
    net = pol.model.unet
    block = net.transformer_blocks[0] if kind == "flux" else net.up_blocks[0].resnets[0]
    calls = []
    block.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_gradient_checkpointing_gives_the_same_lora_gradients(folders, kind):
    grads, calls = {}, {}
    for gc in (False, True):
        torch.manual_seed(3)  # the same LoRA init both times
        pol = _load(folders, kind, gradient_checkpointing=gc)
        with torch.no_grad():  # trained-looking adapters (B = 0 at init would leave A's gradient 0)
            for p in pol.trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
        cond, _ = _inputs(pol)
        x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
        eps = torch.randn(pol.dsm_noise_shape(x0), generator=torch.Generator().manual_seed(5))
        counter = _block_calls(pol, kind)
        pol.dsm(x0, cond, torch.tensor([0.3, 0.6]), eps).sum().backward()
        calls[gc] = len(counter)
        grads[gc] = torch.cat([p.grad.flatten() for p in pol.trainable_parameters()])
    assert calls == {False: 1, True: 2}  # the block really is recomputed in the backward pass
    rel = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    print(f"{kind}: gradient checkpointing on/off relative difference {rel:.1e}")
    assert grads[False].norm() > 0 and rel <= 1e-6, rel


def test_dtype_settings_are_validated(folders):
    with pytest.raises(ConfigError, match=r"dtype must be one of fp32 \| bf16 \| fp16, got 'float16'"):
        OneStepSD.from_pretrained(folders / "onestep", OneStepSDConfig(dtype="float16"))
    with pytest.raises(ConfigError, match=r"vae_dtype must be one of fp32 \| bf16 \| fp16, got 'half'"):
        from_dict(ControlNetSDConfig, {"vae_dtype": "half"})
    with pytest.raises(ConfigError, match="gradient_checkpointing must be true or false"):
        from_dict(FluxControlNetConfig, {"gradient_checkpointing": "yes"})
    assert from_dict(OneStepSDConfig, {"dtype": "bf16"}).dtype == "bf16"
