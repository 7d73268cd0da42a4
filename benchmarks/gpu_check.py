"""Measure one training step of every method on every diffusers backend: peak memory and
seconds per step, with random weights at real (or reduced) widths built from the configs below —
nothing is downloaded. Each (backend, method) runs in its own process through sralign's own
trainers (``OnlineTrainer`` / ``OfflineTrainer``), so the figures are what a run would see.

    bash benchmarks/gpu_check.sh                                        # cuda, real widths, 512² output
    python benchmarks/gpu_check.py --device cuda --size full --lr-size 128 --group 6 --micro-batch 1
    python benchmarks/gpu_check.py --device cpu --size tiny             # the script itself, on a CPU

Sizes: ``full`` = SD2.1 UNet / ControlNet and FLUX.1-dev transformer + a 4-layer FLUX ControlNet
(the published widths and depths); ``reduced`` = half-width UNet, 4+8-layer FLUX; ``tiny`` = toy
widths for a CPU check. Text encoders are not built: prompt embeddings are computed once per
prompt and cached, so they take no part in a step (their weights add to the memory figure of a
real run: OpenCLIP-H 0.35 B, CLIP-L + T5-XXL 4.9 B parameters).

What a step is: online (gdpo, dgpo, grpo) — one rollout group of G per LR (batch_lr 1), the reward
(built-in PSNR + sharpness, cheap on purpose), advantages, the loss with its backward, the optimizer
and EMA update; timed from the end of step 1 to the end of step 2 (no checkpoint in between).
Offline (dpo, dp2o) — ``--pairs`` pairs through ``micro_batch`` pairs per forward/backward, then
the optimizer step; candidates come from the same policy (M = 4 for 2 LR images) first.
Memory: ``torch.cuda.max_memory_allocated`` over the measured steps on a GPU; on a CPU the peak
resident set of the process (which also covers building the models and the candidates).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = {"osediff": ("gdpo", "dpo", "dp2o"), "controlnet-sd": ("dgpo", "grpo", "dpo", "dp2o"), "flux": ("dgpo", "grpo", "dpo", "dp2o")}

SD21_UNET = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56])


def configs(size: str) -> tuple[dict, dict, dict, int]:
    """(unet, vae, flux transformer, flux ControlNet layers) for ``size``."""
    if size == "full":
        return SD21_UNET, SD_VAE, FLUX_DEV, 4
    if size == "reduced":
        return (dict(SD21_UNET, block_out_channels=(160, 320, 640, 640)), SD_VAE,
                dict(FLUX_DEV, num_layers=4, num_single_layers=8), 2)
    unet = dict(in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
               layers_per_block=1, latent_channels=4, norm_num_groups=8)
    flux = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=[2, 2, 4])
    return unet, vae, flux, 1


def build(kind: str, size: str, dtype: str = "fp32", checkpointing: bool = True):
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, FluxControlNetModel, FluxTransformer2DModel, UNet2DConditionModel

    from sralign.policies.diffusers import ControlNetSD, ControlNetSDConfig, FluxControlNet, FluxControlNetConfig, OneStepSD, OneStepSDConfig

    unet_cfg, vae_cfg, flux_cfg, cn_layers = configs(size)
    prec = dict(dtype=dtype, gradient_checkpointing=checkpointing)  # frozen weights in dtype, LoRA in fp32
    torch.manual_seed(0)
    if kind == "flux":
        vae = AutoencoderKL(**dict(vae_cfg, latent_channels=16))
        cn = FluxControlNetModel(**dict(flux_cfg, num_layers=cn_layers, num_single_layers=0))
        return FluxControlNet(vae, FluxTransformer2DModel(**flux_cfg), cn, config=FluxControlNetConfig(**prec))
    vae = AutoencoderKL(**vae_cfg)
    unet = UNet2DConditionModel(**unet_cfg)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if kind == "osediff":
        return OneStepSD(vae, unet, sched, config=OneStepSDConfig(**prec))
    tiny = size == "tiny"
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16) if tiny else (16, 32, 96, 256))
    return ControlNetSD(vae, unet, cn, sched, config=ControlNetSDConfig(**prec))


def hr_folder(root: Path, side: int) -> str:
    from sralign.data.images import save_image

    d = root / "hr"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        base = torch.rand(3, side // 8, side // 8, generator=g)
        save_image(torch.nn.functional.interpolate(base[None], size=(side, side), mode="bicubic").clamp(0, 1)[0], d / f"hr{i}.png")
    return str(d)


def one(a, backend: str, method: str) -> dict:
    from sralign.train.candidates import GenerateConfig, LRSetConfig, generate, score_store

    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    pol = build(backend, a.size, a.dtype, not a.no_checkpointing)
    if dev.type == "cuda":
        pol.to(dev)
    side = a.lr_size
    steps = 1 if backend == "osediff" else a.steps
    sampler = "onestep" if backend == "osediff" else "ode"
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    lr_set = LRSetConfig(n=2, patch=side * pol.scale, scale=pol.scale, hr_dir=hr_folder(tmp, side * pol.scale))
    reward = dict(fr_metrics=["psnr"], nr_metrics=["sharpness"])
    if method in ("dpo", "dp2o"):
        from sralign.data.store import CandidateStore
        from sralign.train.offline import OfflineTrainer
        from sralign.train.offline_config import DP2OConfig

        st = CandidateStore(tmp / "store")
        generate(st, pol, GenerateConfig(m=4, sampler=sampler, steps=steps, chunk=a.group, lr_set=lr_set), progress=False)
        score_store(st, ["psnr", "sharpness"], progress=False)
        cfg = DP2OConfig(method=method, n=1, batch_pairs=a.pairs, micro_batch=a.micro_batch, mixed_precision=a.mixed_precision, **reward)
        tr = OfflineTrainer(pol, st, cfg, tmp / "run")
        times = []
        for i in range(3):
            if i == 1 and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            tr.opt.zero_grad(set_to_none=True)
            idx = torch.randint(len(tr.pairs), (cfg.batch_pairs,), generator=tr.gen).tolist()
            tr.accumulate([tr.pairs[j] for j in idx])
            tr.accel.sync_and_clip(pol.trainable_parameters(), cfg.grad_clip)
            tr.opt.step()
            sync()
            times.append(time.perf_counter())
        shape = f"{a.pairs} pairs, micro-batch {a.micro_batch or a.pairs}"
    else:
        from sralign.train.online import OnlineTrainer
        from sralign.train.online_config import DGPOConfig, GDPOConfig, GRPOConfig

        cls = {"gdpo": GDPOConfig, "dgpo": DGPOConfig, "grpo": GRPOConfig}[method]
        cfg = cls(steps_total=3, batch_lr=1, group=a.group, steps=steps, reward="hybrid", checkpoint_every=10**6, lr_set=lr_set,
                  mixed_precision=a.mixed_precision, **reward)
        if method == "dgpo":
            cfg.sampler = sampler
        micro = "n/a (the online trainer has no micro_batch yet)"
        if hasattr(cfg, "micro_batch"):
            cfg.micro_batch = a.micro_batch
            micro = str(a.micro_batch or a.group)
        tr = OnlineTrainer(pol, cfg, tmp / "run")
        times = []

        def tick(_):
            sync()
            times.append(time.perf_counter())
            if len(times) == 1 and dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

        tr.train(progress=False, callback=tick)
        shape = f"G={a.group}, micro-batch {micro}"
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
    n_train = sum(p.numel() for p in pol.trainable_parameters())
    n_all = sum(p.numel() for p in pol.model.parameters())
    return {"backend": backend, "method": method, "s_per_step": times[2] - times[1], "peak_gib": peak,
            "out_px": side * pol.scale, "shape": shape, "params_b": n_all / 1e9, "trainable_m": n_train / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="full", choices=["full", "reduced", "tiny"])
    ap.add_argument("--lr-size", type=int, default=None, help="LR side in px (default 128: 512² output; tiny: 8)")
    ap.add_argument("--group", type=int, default=6, help="G rollouts per LR (online)")
    ap.add_argument("--micro-batch", type=int, default=0, help="samples (online) / pairs (offline) per forward-backward; 0 = all")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per offline step")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps of the multi-step backends (default 10; tiny 2)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="frozen weights (LoRA parameters stay fp32)")
    ap.add_argument("--no-checkpointing", action="store_true", help="turn the backbones' gradient checkpointing off")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="autocast of the trainers (online and offline)")
    ap.add_argument("--only", nargs="*", default=None, help="backend:method pairs to run (default all)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.lr_size = a.lr_size or (8 if a.size == "tiny" else 128)
    a.steps = a.steps or (2 if a.size == "tiny" else 10)
    if a.one:
        print("RESULT " + json.dumps(one(a, *a.one.split(":"))), flush=True)
        return
    runs = a.only or [f"{b}:{m}" for b, ms in METHODS.items() for m in ms]
    passthrough = [x for x in sys.argv[1:] if x != "--only" and x not in (a.only or [])]
    print(f"device {a.device}, size {a.size}, frozen weights {a.dtype}, checkpointing {'off' if a.no_checkpointing else 'on'}, LR {a.lr_size}² -> {a.lr_size * 4}² output, group {a.group}, micro-batch {a.micro_batch or 'all'}, "
          f"{a.steps} sampler steps (osediff: 1), {a.pairs} pairs per offline step", flush=True)
    print("| backend | method | params (M) | trainable (M) | batch | s/step | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        r = subprocess.run([sys.executable, __file__, *passthrough, "--one", run], capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {run.replace(':', ' | ')} | failed: {err[:160]} |||||", flush=True)
            continue
        d = json.loads(line[0][7:])
        print(f"| {d['backend']} | {d['method']} | {d['params_b'] * 1e3:.1f} | {d['trainable_m']:.1f} | {d['shape']} | "
              f"{d['s_per_step']:.2f} | {d['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
