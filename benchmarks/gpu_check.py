"""Build each diffusers backend at a reduced but realistic size (random weights), time one
rollout group and one training step, print images/s and peak memory. Meant for a GPU machine:

    bash benchmarks/gpu_check.sh            # cuda, "reduced" sizes (SD2.1-like UNet at half width, 4+8-layer FLUX)
    python benchmarks/gpu_check.py --device cpu --size tiny   # smoke test of the script itself

Nothing is downloaded: models are built from configs.
"""

import argparse
import time

import torch


def build(kind: str, size: str):
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, FluxControlNetModel, FluxTransformer2DModel, UNet2DConditionModel

    from sralign.policies.diffusers import ControlNetSD, FluxControlNet, OneStepSD

    tiny = size == "tiny"
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * (2 if tiny else 4), up_block_types=("UpDecoderBlock2D",) * (2 if tiny else 4),
                        block_out_channels=(8, 16) if tiny else (128, 256, 512, 512), latent_channels=16 if kind == "flux" else 4,
                        norm_num_groups=8 if tiny else 32, layers_per_block=1 if tiny else 2)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if kind in ("osediff", "controlnet-sd"):
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4, layers_per_block=1 if tiny else 2,
            block_out_channels=(16, 32) if tiny else (160, 320, 640, 640),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D") if tiny else ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D") if tiny else ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=16 if tiny else 1024, attention_head_dim=4 if tiny else (5, 10, 20, 20),
            norm_num_groups=8 if tiny else 32, use_linear_projection=not tiny)
        if kind == "osediff":
            return OneStepSD(vae, unet, sched)
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16) if tiny else (16, 32, 96, 256))
        return ControlNetSD(vae, unet, cn, sched)
    cfg = dict(patch_size=1, in_channels=64, num_layers=1 if tiny else 4, num_single_layers=1 if tiny else 8,
               attention_head_dim=8 if tiny else 128, num_attention_heads=2 if tiny else 24, joint_attention_dim=16 if tiny else 4096,
               pooled_projection_dim=8 if tiny else 768, guidance_embeds=True, axes_dims_rope=[2, 2, 4] if tiny else [16, 56, 56])
    return FluxControlNet(vae, FluxTransformer2DModel(**cfg), FluxControlNetModel(**dict(cfg, num_single_layers=0)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="reduced", choices=["reduced", "tiny"])
    ap.add_argument("--lr-size", type=int, default=None, help="LR side (default 128 reduced, 8 tiny)")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    side = a.lr_size or (8 if a.size == "tiny" else 128)
    for kind in ("osediff", "controlnet-sd", "flux"):
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        pol = build(kind, a.size).to(dev)
        sampler, steps = ("onestep", 1) if kind == "osediff" else ("ode", a.steps or (4 if a.size == "tiny" else 10))
        lr = torch.rand(1, 3, side, side, device=dev)
        cond = pol.condition(lr)
        noise = torch.randn(pol.noise_shape(cond, a.group), device=dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        with torch.no_grad():
            pol.sample(cond, noise[:1], sampler=sampler, steps=1)
            sync()
            t = time.perf_counter()
            out = pol.sample(cond, noise, sampler=sampler, steps=steps).images
            sync()
            t_roll = time.perf_counter() - t
        opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-5)
        x0 = out[:2]
        t = time.perf_counter()
        d = pol.dsm(x0, cond, torch.tensor([0.3, 0.6], device=dev), torch.randn(pol.dsm_noise_shape(x0), device=dev))
        with torch.no_grad(), pol.reference():
            d_ref = pol.dsm(x0, cond, torch.tensor([0.3, 0.6], device=dev), torch.randn(pol.dsm_noise_shape(x0), device=dev))
        (d - d_ref).sum().backward()
        opt.step()
        sync()
        t_step = time.perf_counter() - t
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        n_train = sum(p.numel() for p in pol.trainable_parameters())
        print(f"{kind:14s} out {out.shape[-1]}px  rollout of {a.group} ({sampler}, {steps} steps): {t_roll:6.2f} s = {a.group / t_roll:6.2f} img/s   "
              f"train step (2 samples, policy+ref dsm): {t_step:6.2f} s   LoRA params {n_train / 1e6:.2f} M   peak mem {mem:.1f} GiB", flush=True)
        del pol, opt


if __name__ == "__main__":
    main()
