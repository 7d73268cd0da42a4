"""Oracle: ControlNetSD's final latents equal diffusers' own StableDiffusionControlNetPipeline
given the same tiny random weights, scheduler config, prompts, initial latents and per-step
noise (the pipeline's generator is reproduced draw for draw)."""

import json

import pytest
import torch

from diffusers_helpers import write_clip_text_encoder, write_tiny_controlnet_sd
from sralign.policies.diffusers import ControlNetSD, ControlNetSDConfig

SD2_BASE = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "clip_sample": False, "trained_betas": None}
SD21_V = dict(SD2_BASE, _class_name="DDIMScheduler", prediction_type="v_prediction")
PROMPT, NEGATIVE = "a photo of a cat", "blurry"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("oracle-sd") / "base"
    write_tiny_controlnet_sd(d)
    write_clip_text_encoder(d, hidden=16)
    return d


def _folder(base, tmp_path, sched: dict):
    d = tmp_path / "model"
    d.mkdir()
    for sub in ("vae", "unet", "controlnet", "tokenizer", "text_encoder"):
        (d / sub).symlink_to(base / sub)
    (d / "scheduler").mkdir()
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return d


def _pipeline(folder, scheduler_cls):
    import diffusers
    from diffusers import AutoencoderKL, ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    load = dict(local_files_only=True)
    pipe = StableDiffusionControlNetPipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **load),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **load),
        tokenizer=AutoTokenizer.from_pretrained(folder, subfolder="tokenizer", **load),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **load),
        controlnet=ControlNetModel.from_pretrained(folder, subfolder="controlnet", **load),
        scheduler=getattr(diffusers, scheduler_cls).from_pretrained(folder, subfolder="scheduler", **load),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# (diffusers scheduler, sralign sampler, scheduler config, guidance, DDIM η, steps)
CASES = {
    "ddim-eps-cfg-off": ("DDIMScheduler", "ode", SD2_BASE, 1.0, 0.0, 3),
    "ddim-eps-cfg-neg": ("DDIMScheduler", "ode", SD2_BASE, 3.5, 0.0, 3),
    "ddim-eta-eps-cfg-neg": ("DDIMScheduler", "sde", SD2_BASE, 3.5, 0.7, 3),
    "ddpm-eps-cfg-off": ("DDPMScheduler", "ddpm", SD2_BASE, 1.0, 0.0, 4),
    "ddpm-eps-cfg-neg": ("DDPMScheduler", "ddpm", SD2_BASE, 3.5, 0.0, 4),
    "ddpm-v-trailing-cfg-neg": ("DDPMScheduler", "ddpm", dict(SD21_V, timestep_spacing="trailing"), 2.0, 0.0, 3),
    "ddim-v-cfg-off": ("DDIMScheduler", "ode", SD21_V, 1.0, 0.0, 3),
    "ddim-v-linspace-alpha1-cfg-neg": ("DDIMScheduler", "sde", dict(SD21_V, timestep_spacing="linspace", set_alpha_to_one=True), 2.0, 1.0, 3),
    "ddim-sample-trailing": ("DDIMScheduler", "ode", dict(SD2_BASE, prediction_type="sample", timestep_spacing="trailing"), 1.0, 0.0, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_oracle_controlnet_sd_matches_diffusers_pipeline(base, tmp_path, case):
    sched_cls, sampler, sched, g, eta, steps = CASES[case]
    folder = _folder(base, tmp_path, sched)
    pol = ControlNetSD.from_pretrained(folder, ControlNetSDConfig(guidance_scale=g, prompt=PROMPT, negative_prompt=NEGATIVE,
                                                                 sde_noise_level=eta))
    pipe = _pipeline(folder, sched_cls)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = pol.condition(lr)
    noise = torch.randn(pol.noise_shape(cond), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = pol.sample(cond, noise, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(2),
                          output_latents=True).images
        theirs = pipe(PROMPT, image=cond.lr_up, height=32, width=32, num_inference_steps=steps, guidance_scale=g,
                      negative_prompt=NEGATIVE, eta=eta, latents=noise.clone(), generator=torch.Generator().manual_seed(2),
                      output_type="latent").images
    diff = float((ours - theirs).abs().max())
    print(f"ORACLE {case}: max |sralign - diffusers| = {diff:.3g} (latents std {float(theirs.std()):.3g})")
    assert ours.shape == theirs.shape and torch.isfinite(ours).all()
    assert diff <= 1e-5, diff
    # not a vacuous match: the sample moved away from the start noise, and the prompt pair matters with CFG
    assert float((ours - noise).abs().max()) > 1e-2


def test_oracle_negative_prompt_and_guidance_change_the_result(base, tmp_path):
    """The CFG cases above are not trivially equal to the unguided ones; g ≤ 1 runs no CFG."""
    folder = _folder(base, tmp_path, SD2_BASE)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        pol = ControlNetSD.from_pretrained(folder, ControlNetSDConfig(prompt=PROMPT, **kw))
        cond = pol.condition(lr)
        noise = torch.randn(pol.noise_shape(cond), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return pol.sample(cond, noise, steps=2, output_latents=True).images

    g1, g05 = run(guidance_scale=1.0, negative_prompt=NEGATIVE), run(guidance_scale=0.5, negative_prompt=NEGATIVE)
    neg_a, neg_b = run(guidance_scale=3.5, negative_prompt=NEGATIVE), run(guidance_scale=3.5, negative_prompt="sharp")
    assert torch.equal(g1, g05)  # as diffusers: guidance below 1 is no guidance
    assert float((neg_a - neg_b).abs().max()) > 1e-4 and float((neg_a - g1).abs().max()) > 1e-4
