"""Training memory (parameters + gradients + AdamW state) of the real backbones at full size:
full fine-tune vs LoRA r4 vs LoRA r64. Models are built on the meta device from configs written
by hand from the published model cards / config files, so nothing is downloaded or allocated.

    python benchmarks/memory_table.py        (needs the [diffusers] extra)

Accounting of the first table: frozen weights in bf16 (2 B/param); every trainable parameter
costs an fp32 master copy, an fp32 gradient and two fp32 AdamW moments (16 B/param). Activations
are not included.

The second table is measured, not assumed: each backend is built on the meta device through its
own constructor with ``dtype="bf16"`` (the path ``from_pretrained`` takes: frozen weights cast,
LoRA adapters added and kept in fp32, VAE in ``vae_dtype``), and the bytes are summed from the
parameters' stored dtypes, next to the same components in fp32 (the baseline, same process).
"""

import torch
from diffusers import AutoencoderKL, ControlNetModel, FluxControlNetModel, FluxTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

GB = 1024**3

SD21_UNET = dict(sample_size=96, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
FLUX_VAE = dict(SD_VAE, latent_channels=16)
OPENCLIP_H = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, projection_dim=1024, hidden_act="gelu")
CLIP_L = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
T5_XXL = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128, feed_forward_proj="gated-gelu")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def lora_params(m, rank: int, targets) -> int:
    total = 0
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            total += rank * (mod.in_features + mod.out_features)
    return total


def row(name, trainable_nets, frozen_nets, targets):
    frozen = sum(n_params(m) for m in frozen_nets)
    train = sum(n_params(m) for m in trainable_nets)
    full = (frozen * 2 + train * 16) / GB
    out = [name, f"{(frozen + train) / 1e9:.2f} B", f"{full:.1f}"]
    for r in (4, 64):
        lp = sum(lora_params(m, r, targets) for m in trainable_nets)
        out.append(f"{((frozen + train) * 2 + lp * 16) / GB:.1f} ({lp / 1e6:.1f} M LoRA)")
    return out


def component_table() -> None:
    """Per-component parameter bytes as the backends store them with dtype=bf16 (vae_dtype fp32)."""
    from diffusers import DDPMScheduler

    from sralign.policies.diffusers import (ControlNetSD, ControlNetSDConfig, FluxControlNet, FluxControlNetConfig, OneStepSD,
                                            OneStepSDConfig)
    from sralign.policies.diffusers.loading import param_bytes, torch_dtype

    def fp32_bytes(m) -> int:
        return sum(p.numel() * 4 for p in m.parameters())

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD_VAE)
        cn = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        flux, fcn, fvae = FluxTransformer2DModel(**FLUX_DEV), FluxControlNetModel(**dict(FLUX_DEV, num_layers=4, num_single_layers=0)), AutoencoderKL(**FLUX_VAE)
        texts = {"OpenCLIP-H text": CLIPTextModel(OPENCLIP_H), "CLIP-L text": CLIPTextModel(CLIP_L), "T5-XXL encoder": T5EncoderModel(T5_XXL)}
    base32 = {id(m): fp32_bytes(m) for m in (unet, vae, cn, flux, fcn, fvae, *texts.values())}
    one = OneStepSD(vae, unet, DDPMScheduler(), OneStepSDConfig(dtype="bf16"), device="meta")
    csd = ControlNetSD(AutoencoderKL(**SD_VAE).to("meta"), UNet2DConditionModel(**SD21_UNET).to("meta"), cn, DDPMScheduler(),
                       ControlNetSDConfig(dtype="bf16"), device="meta")
    fx = FluxControlNet(fvae, flux, fcn, FluxControlNetConfig(dtype="bf16"), device="meta")
    for t in texts.values():  # the text encoders load in the backend's dtype as well (PromptEncoder)
        t.requires_grad_(False).to(torch_dtype("bf16"))
    rows = [("SD2.1 UNet + LoRA r4 (OneStepSD)", one.model.unet, base32[id(unet)]), ("SD VAE (vae_dtype fp32)", one.model.vae, base32[id(vae)]),
            ("SD2 ControlNet (C-SD2)", csd.model.controlnet, base32[id(cn)]),
            ("FLUX.1-dev transformer + LoRA r4", fx.model.unet, base32[id(flux)]), ("FLUX ControlNet (4, 0)", fx.model.controlnet, base32[id(fcn)]),
            ("FLUX VAE (vae_dtype fp32)", fx.model.vae, base32[id(fvae)])]
    rows += [(name, m, base32[id(m)]) for name, m in texts.items()]
    print("\n| component | frozen GB (bf16) | LoRA MB (fp32) | all fp32 GB | ratio |")
    print("|---|---|---|---|---|")
    for name, m, b32 in rows:
        frozen, lora = param_bytes(m, trainable=False), param_bytes(m, trainable=True)
        print(f"| {name} | {frozen / GB:.2f} | {lora / 2**20:.1f} | {b32 / GB:.2f} | {(frozen + lora) / b32:.2f} |")
    for name, pol, text in (("OneStepSD", one, ["OpenCLIP-H text"]), ("ControlNet-SD2", csd, ["OpenCLIP-H text"]),
                            ("FLUX ControlNet", fx, ["CLIP-L text", "T5-XXL encoder"])):
        w = param_bytes(pol.model) + sum(param_bytes(texts[t]) for t in text)
        lora = sum(p.numel() for p in pol.trainable_parameters())
        print(f"{name}: weights as stored {w / GB:.2f} GB (text encoders included) + LoRA gradient and AdamW state "
              f"{lora * 12 / 2**20:.0f} MB = {(w + lora * 12) / GB:.2f} GB before activations")


def main() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
        vae = AutoencoderKL(**SD_VAE)
        te_h = CLIPTextModel(OPENCLIP_H)
        cnet = ControlNetModel.from_unet(unet)
        flux = FluxTransformer2DModel(**FLUX_DEV)
        flux_cn = FluxControlNetModel(**dict(FLUX_DEV, num_layers=4, num_single_layers=0))
        fvae = AutoencoderKL(**FLUX_VAE)
        clip_l = CLIPTextModel(CLIP_L)
        t5 = T5EncoderModel(T5_XXL)
    rows = [
        row("OneStepSD (SD2.1 UNet; VAE, OpenCLIP-H frozen)", [unet], [vae, te_h], UNET_TARGETS),
        row("ControlNet-SD2 (train UNet+ControlNet; VAE, text frozen)", [unet, cnet], [vae, te_h], UNET_TARGETS),
        row("FLUX ControlNet (train transformer+ControlNet; VAE, CLIP-L, T5-XXL frozen)", [flux, flux_cn], [fvae, clip_l, t5], FLUX_TARGETS),
    ]
    head = ["backend", "params", "full fine-tune GB", "LoRA r4 GB", "LoRA r64 GB"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(f"\ncomponents: SD2.1 UNet {n_params(unet) / 1e6:.0f} M, VAE {n_params(vae) / 1e6:.0f} M, OpenCLIP-H text {n_params(te_h) / 1e6:.0f} M, "
          f"ControlNet {n_params(cnet) / 1e6:.0f} M, FLUX transformer {n_params(flux) / 1e9:.2f} B, FLUX ControlNet(4,0) {n_params(flux_cn) / 1e6:.0f} M, "
          f"T5-XXL encoder {n_params(t5) / 1e9:.2f} B, CLIP-L {n_params(clip_l) / 1e6:.0f} M")
    component_table()


if __name__ == "__main__":
    main()
