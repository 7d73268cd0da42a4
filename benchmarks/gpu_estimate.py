"""An estimate of GPU peak memory and s/step of one training step (no GPU here): GDPO-SR on an
SD2-size OneStepSD (G = 6), DP²O-SR on C-SD2 pairs, DGPO on a FLUX-size ControlNet LoRA (G = 8,
micro-batch 1), bf16, 512² output. ``benchmarks/gpu_check.py --device cuda`` measures the same.

    python benchmarks/gpu_estimate.py                       (needs the [diffusers] extra; ~1 min, no allocation)
    python benchmarks/gpu_estimate.py --tflops 400          (sustained bf16 TFLOP/s assumed for s/step)

The settings are those of the two measuring commands (a GPU machine, [diffusers] extra):

    python benchmarks/gpu_check.py --device cuda --size full --dtype bf16 --mixed-precision bf16 --group 6 --only osediff:gdpo controlnet-sd:dp2o
    python benchmarks/gpu_check.py --device cuda --size full --dtype bf16 --mixed-precision bf16 --group 8 --micro-batch 1 --only flux:dgpo

Every network is built on the meta device (nothing is allocated or downloaded), so the figures
are *counted*, not timed:
- weights: the bytes of the parameters as sralign's backends store them with ``dtype=bf16``
  (``vae_dtype`` fp32, LoRA r4 in fp32; the same construction as ``memory_table.py``);
- LoRA state: fp32 gradient + two AdamW moments, 12 B per trainable parameter;
- activations: the bytes autograd keeps for the backward pass in one training forward of the
  denoiser (UNet / ControlNet + UNet / ControlNet + FLUX transformer, bf16, gradient
  checkpointing on): the tensors saved outside checkpointed segments plus each segment's inputs
  (frozen weights excluded), plus the largest segment's internals, which its recomputation
  holds during the backward; times the samples per forward-backward (micro-batch);
- FLOPs: ``torch.utils.flop_counter`` over every forward of the step; a backward costs one
  forward (frozen weights need no weight gradient; LoRA's is negligible) and checkpointing
  recomputes one more. s/step = FLOPs / the assumed sustained throughput (an assumption, printed).
The segment figure uses PyTorch's math attention on the meta device, which keeps the N×N
attention weights; the flash / memory-efficient kernels a GPU runs do not, so it is an upper
bound for the attention segments. s/step is compute-bound arithmetic: a lower bound where a step
is small enough for kernel launches, the fp32 VAE or the rewards to matter.
Not counted: the rewards (cheap metrics here), the optimizer step, the CUDA context (~0.5 GB),
allocator fragmentation, and the text encoders (prompt embeddings are cached: their weights are
printed separately and need not stay on the GPU).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from memory_table import CLIP_L, FLUX_DEV, FLUX_VAE, OPENCLIP_H, SD21_UNET, SD_VAE, T5_XXL

GB = 1024**3
BF16 = torch.bfloat16


class Counter:
    """Bytes autograd keeps for backward (frozen weights excluded) and the largest segment."""

    def __init__(self, params):
        self.frozen = {id(p) for p in params}
        self.kept: dict[int, int] = {}
        self.seg_peak = 0

    def _is_weight(self, t) -> bool:
        return id(t) in self.frozen or (t._base is not None and id(t._base) in self.frozen)

    def pack_into(self, store: dict):
        def pack(t):
            if not self._is_weight(t):
                store[id(t)] = t.numel() * t.element_size()
            return t
        return pack

    def ckpt(self, module, *args, **kw):
        for a in args:  # the segment's inputs stay alive until its recomputation
            if torch.is_tensor(a) and not self._is_weight(a):
                self.kept[id(a)] = a.numel() * a.element_size()
        inner: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(self.pack_into(inner), lambda t: t):
            module(*args, **kw)  # what the recomputation holds during this segment's backward
        self.seg_peak = max(self.seg_peak, sum(inner.values()))
        return checkpoint(module.__call__, *args, use_reentrant=False, **kw)

    def run(self, fn) -> tuple[int, int]:
        """(bytes kept until the backward, bytes of the largest segment's recomputation)."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack_into(self.kept), lambda t: t), torch.device("meta"):
            fn()
        return sum(self.kept.values()), self.seg_peak


def flops(fn) -> float:
    fc = FlopCounterMode(display=False)
    with fc, torch.device("meta"):
        fn()
    return float(fc.get_total_flops())


def train_mode(nets, counter: Counter | None):
    for n in nets:
        n.train()
        if counter is None:
            n.disable_gradient_checkpointing()
        else:
            n.enable_gradient_checkpointing(gradient_checkpointing_func=counter.ckpt)


def activations(nets, fwd, lora_params) -> tuple[float, float]:
    """(GB kept for the backward, GB of the largest checkpointed segment's recomputation) of one
    training forward ``fwd`` (bf16, checkpointing on)."""
    frozen = [p for n in nets for p in n.parameters()]
    c = Counter(frozen)
    train_mode(nets, c)
    for p in lora_params:
        p.requires_grad_(True)
    kept, seg = c.run(fwd)
    train_mode(nets, None)
    return kept / GB, seg / GB


def sd_nets(controlnet: bool):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET).to(BF16).requires_grad_(False)
        vae = AutoencoderKL(**SD_VAE).requires_grad_(False)  # vae_dtype fp32
        cn = ControlNetModel.from_unet(unet, load_weights_from_unet=False).to(BF16).requires_grad_(False) if controlnet else None
    return unet, vae, cn


def lora_stand_in(nets) -> list[torch.nn.Parameter]:
    """One weight per net (its first Linear's) to require grad, so that autograd records the
    graph as LoRA adapters make it (their own activations are tiny next to the frozen path;
    their parameter count comes from the backends in ``weights``)."""
    ps = []
    for n in nets:
        first = next(m for m in n.modules() if isinstance(m, torch.nn.Linear))
        ps.append(first.weight)
    return ps


def weights(kind: str) -> tuple[float, float, int]:
    """(weights GB as stored with dtype=bf16 excluding text encoders, text encoders GB, LoRA params)."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, FluxControlNetModel, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, T5EncoderModel

    from sralign.policies.diffusers import ControlNetSD, ControlNetSDConfig, FluxControlNet, FluxControlNetConfig, OneStepSD, OneStepSDConfig
    from sralign.policies.diffusers.loading import param_bytes

    with torch.device("meta"):
        vae = AutoencoderKL(**(FLUX_VAE if kind == "flux" else SD_VAE))
        if kind == "flux":
            net = FluxTransformer2DModel(**FLUX_DEV)
            cn = FluxControlNetModel(**dict(FLUX_DEV, num_layers=4, num_single_layers=0))
            texts = [CLIPTextModel(CLIP_L), T5EncoderModel(T5_XXL)]
        else:
            net = UNet2DConditionModel(**SD21_UNET)
            cn = ControlNetModel.from_unet(net, load_weights_from_unet=False) if kind == "csd2" else None
            texts = [CLIPTextModel(OPENCLIP_H)]
    if kind == "osediff":
        pol = OneStepSD(vae, net, DDPMScheduler(), OneStepSDConfig(dtype="bf16"), device="meta")
    elif kind == "csd2":
        pol = ControlNetSD(vae, net, cn, DDPMScheduler(), ControlNetSDConfig(dtype="bf16"), device="meta")
    else:
        pol = FluxControlNet(vae, net, cn, FluxControlNetConfig(dtype="bf16"), device="meta")
    text_gb = sum(sum(p.numel() for p in t.parameters()) * 2 for t in texts) / GB
    return param_bytes(pol.model) / GB, text_gb, sum(p.numel() for p in pol.trainable_parameters())


def vae_flops(vae, side: int, n_enc: int, n_dec: int) -> float:
    with torch.device("meta"):
        img = torch.randn(1, 3, side, side)
        z = torch.randn(1, vae.config.latent_channels, side // 8, side // 8)
    with torch.no_grad():
        return n_enc * flops(lambda: vae.encode(img)) + n_dec * flops(lambda: vae.decode(z))


def gdpo(a) -> dict:
    """GDPO-SR on OneStepSD: one-step rollouts of G from π_ref (UNet once per sample, VAE decode),
    then the DSM of each sample with the policy (grad) and the reference (no grad)."""
    G, side = a.group, a.side
    unet, vae, _ = sd_nets(False)
    with torch.device("meta"):
        def inp(b):
            return torch.randn(b, 4, side // 8, side // 8, dtype=BF16), torch.full((b,), 500), torch.randn(b, 77, 1024, dtype=BF16)
    f1 = flops(lambda: unet(*inp(1)))
    # rollout: encode LR (once) + UNet + decode per sample; DSM: encode x0 per sample, UNet policy
    # fwd + ref fwd + backward (1 fwd) + recompute (1 fwd) per sample
    total = vae_flops(vae, side, 1 + G, G) + G * f1 + G * 4 * f1
    mb = a.micro_batch or G
    act = activations([unet], lambda: unet(*inp(mb)), lora_stand_in([unet]))
    return dict(flops=total, act=act, mb=mb)


def dp2o(a) -> dict:
    """DP²O-SR on C-SD2: per pair, winner and loser share t and ε: ControlNet + UNet with grad and
    without (reference), ``--pairs`` pairs per step through ``micro_batch`` pairs at a time."""
    side = a.side
    unet, vae, cn = sd_nets(True)
    with torch.device("meta"):
        def inp(b):
            return (torch.randn(b, 4, side // 8, side // 8, dtype=BF16), torch.full((b,), 500), torch.randn(b, 77, 1024, dtype=BF16),
                    torch.randn(b, 3, side, side, dtype=BF16))

    def fwd(b):
        z, t, e, c = inp(b)
        down, mid = cn(z, t, encoder_hidden_states=e, controlnet_cond=c, return_dict=False)
        return unet(z, t, encoder_hidden_states=e, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    f1 = flops(lambda: fwd(1))
    n = 2 * a.pairs  # images per step
    total = vae_flops(vae, side, n, 0) + n * 4 * f1
    mb = 2 * (a.micro_batch or a.pairs)
    act = activations([unet, cn], lambda: fwd(mb), lora_stand_in([unet, cn]))
    return dict(flops=total, act=act, mb=mb)


def dgpo(a) -> dict:
    """DGPO on FLUX ControlNet LoRA: ``--steps``-step ODE rollouts of G (ControlNet + transformer
    per step), then per sample the DSM with the policy (no grad for the group terms, then grad
    per micro-batch) and the reference (no grad)."""
    from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel

    G, side = a.group, a.side
    with torch.device("meta"):
        tr = FluxTransformer2DModel(**FLUX_DEV).to(BF16).requires_grad_(False)
        cn = FluxControlNetModel(**dict(FLUX_DEV, num_layers=4, num_single_layers=0)).to(BF16).requires_grad_(False)
        vae = AutoencoderKL(**FLUX_VAE).requires_grad_(False)
        tok = (side // 16) ** 2

        def inp(b):
            return dict(hidden_states=torch.randn(b, tok, 64, dtype=BF16), encoder_hidden_states=torch.randn(b, a.t5_len, 4096, dtype=BF16),
                        pooled_projections=torch.randn(b, 768, dtype=BF16), timestep=torch.full((b,), 0.5, dtype=BF16),
                        img_ids=torch.zeros(tok, 3), txt_ids=torch.zeros(a.t5_len, 3), guidance=torch.full((b,), 2.5, dtype=BF16))

    def fwd(b):
        kw = inp(b)
        blocks, single = cn(controlnet_cond=torch.randn(b, tok, 64, dtype=BF16, device="meta"), return_dict=False, **kw)
        return tr(controlnet_block_samples=blocks, controlnet_single_block_samples=single, return_dict=False, **kw)

    f1 = flops(lambda: fwd(1))
    # rollout: steps × G; DSM: policy no-grad (group terms) + reference + (fwd + recompute + bwd) per sample
    total = vae_flops(vae, side, 1 + G, G) + a.steps * G * f1 + G * 5 * f1
    mb = a.micro_batch or G
    act = activations([tr, cn], lambda: fwd(mb), lora_stand_in([tr, cn]))
    return dict(flops=total, act=act, mb=mb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=512, help="output side in px")
    ap.add_argument("--tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s assumed (H100 SXM dense peak 989; ~40%% of it)")
    ap.add_argument("--t5-len", type=int, default=512, help="T5 tokens of FLUX.1-dev's prompt")
    a = ap.parse_args()
    runs = [("GDPO-SR", "osediff", gdpo, dict(group=6, micro_batch=0, steps=1), 24),
            ("DP²O-SR", "csd2", dp2o, dict(group=0, micro_batch=0, steps=0, pairs=4), 24),
            ("DGPO", "flux", dgpo, dict(group=8, micro_batch=1, steps=10), 80)]
    print(f"{a.side}² output, bf16 frozen weights, LoRA r4 fp32, checkpointing on; s/step at {a.tflops:.0f} TFLOP/s sustained (assumed)")
    print("| method | backend | batch | weights GB | text enc. GB | LoRA state GB | activations GB (kept + largest segment) | est. peak GB (with text enc.) | goal GB | TFLOP/step | est. s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, kind, fn, kw, goal in runs:
        b = argparse.Namespace(**vars(a), **kw)
        w, text, n_lora = weights(kind)
        r = fn(b)
        lora = n_lora * 12 / GB
        kept, seg = r["act"]
        peak = w + lora + kept + seg
        batch = {"osediff": lambda: f"G={b.group}, all at once", "csd2": lambda: f"{b.pairs} pairs at once",
                 "flux": lambda: f"G={b.group}, micro-batch {b.micro_batch}, {b.steps}-step ODE"}[kind]()
        print(f"| {name} | {kind} | {batch} | {w:.2f} | {text:.2f} | {lora:.3f} | {kept:.2f} + {seg:.2f} | {peak:.1f} ({peak + text:.1f}) | ≤ {goal} | "
              f"{r['flops'] / 1e12:.1f} | {r['flops'] / (a.tflops * 1e12):.2f} |", flush=True)


if __name__ == "__main__":
    main()
