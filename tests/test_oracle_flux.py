"""Oracle: FluxControlNet's final latents equal diffusers' own FluxControlNetPipeline given the
same tiny random weights, scheduler config, prompt embeddings and initial latents: FLUX.1-dev's
dynamic shift (μ from the token count), a static shift and an unshifted schedule; the control
latent as the VAE posterior's mode or a draw from it (the pipeline draws with its generator)."""

import json

import pytest
import torch

from diffusers_helpers import FLUX_TINY, _give_voice
from sralign.policies.diffusers import FluxControlNet, FluxControlNetConfig

DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
       "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
UNSHIFTED = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
STATIC3 = dict(UNSHIFTED, shift=3.0)


def _write(folder, cn_guidance: bool, sched: dict | None) -> None:
    from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel

    torch.manual_seed(0)
    # a FLUX-style VAE: latents shifted and scaled (FLUX.1's shift_factor / scaling_factor)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=32,
                        scaling_factor=0.3611, shift_factor=0.1159)
    tr = FluxTransformer2DModel(**FLUX_TINY)
    cn = FluxControlNetModel(**dict(FLUX_TINY, num_single_layers=0, guidance_embeds=cn_guidance))
    _give_voice(cn)
    vae.save_pretrained(folder / "vae")
    tr.save_pretrained(folder / "transformer")
    cn.save_pretrained(folder / "controlnet")
    if sched is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))


def _pipeline(folder):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline, FluxTransformer2DModel

    load = dict(local_files_only=True)
    sched = (FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", **load) if (folder / "scheduler").is_dir()
             else FlowMatchEulerDiscreteScheduler.from_config(DEV))
    pipe = FluxControlNetPipeline(
        scheduler=sched, vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", **load), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", **load),
        controlnet=FluxControlNetModel.from_pretrained(folder, subfolder="controlnet", **load))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# (scheduler config written to the folder (None: none, FLUX.1-dev's applies), ControlNet with guidance embedding, control latent, steps)
CASES = {
    "dev-dynamic-shift": (DEV, True, "mode", 3),
    "no-scheduler-folder-is-dev": (None, True, "mode", 2),
    "unshifted": (UNSHIFTED, True, "mode", 3),
    "static-shift-3": (STATIC3, True, "mode", 2),
    "dev-posterior-sample-cn-without-guidance": (DEV, False, "sample", 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_oracle_flux_matches_diffusers_pipeline(tmp_path, monkeypatch, case):
    sched, cn_guidance, control, steps = CASES[case]
    if control == "mode":  # the pipeline always draws from the posterior; make it take the mode as sralign's default does
        import diffusers.pipelines.flux.pipeline_flux_controlnet as fpc

        monkeypatch.setattr(fpc, "retrieve_latents", lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode())
    folder = tmp_path / "flux"
    _write(folder, cn_guidance, sched)
    pol = FluxControlNet.from_pretrained(folder, FluxControlNetConfig(guidance_scale=2.5, control_latent=control))
    g = torch.Generator().manual_seed(5)
    pol.prompt_embeds = torch.randn(1, 3, FLUX_TINY["joint_attention_dim"], generator=g)
    pol.pooled = torch.randn(1, FLUX_TINY["pooled_projection_dim"], generator=g)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = pol.condition(lr, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(pol.noise_shape(cond), generator=torch.Generator().manual_seed(1))
    pipe = _pipeline(folder)
    with torch.no_grad():
        ours = pol.sample(cond, noise, steps=steps, output_latents=True).images
        theirs = pipe(prompt_embeds=pol.prompt_embeds, pooled_prompt_embeds=pol.pooled, control_image=cond.lr_up * 2 - 1,
                      height=32, width=32, num_inference_steps=steps, guidance_scale=2.5, latents=noise.clone(),
                      generator=torch.Generator().manual_seed(3), output_type="latent").images
    diff = float((ours - theirs).abs().max())
    print(f"ORACLE {case}: max |sralign - diffusers| = {diff:.3g} (latents std {float(theirs.std()):.3g})")
    assert ours.shape == theirs.shape and diff <= 1e-5, diff
    assert float((ours - noise).abs().max()) > 1e-2


def test_oracle_flux_sigma_grids():
    """FLUX.1-dev at 512² (1024 tokens), C-FLUX's 25 steps: σ = 1, .978, .956, … (the issue's
    figures); unshifted: linspace(1, 1/S, S) then 0."""
    from sralign.policies.diffusers.flux_controlnet import flux_mu, read_flow_scheduler

    sch = read_flow_scheduler(None)
    import numpy as np

    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / 25, 25), mu=flux_mu(1024, sch.config))
    assert [round(float(s), 3) for s in sch.sigmas[:3]] == [1.0, 0.978, 0.956] and float(sch.sigmas[-1]) == 0.0
    from diffusers import FlowMatchEulerDiscreteScheduler

    flat = FlowMatchEulerDiscreteScheduler.from_config(UNSHIFTED)
    flat.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    assert torch.allclose(flat.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
