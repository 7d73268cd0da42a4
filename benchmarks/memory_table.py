"""Training memory (parameters + gradients + AdamW state) of the real backbones at full size:
full fine-tune vs LoRA r4 vs LoRA r64. Models are built on the meta device from configs written
by hand from the published model cards / config files, so nothing is downloaded or allocated.

    python benchmarks/memory_table.py        (needs the [diffusers] extra)

Accounting: frozen weights in bf16 (2 B/param); every trainable parameter costs an fp32 master
copy, an fp32 gradient and two fp32 AdamW moments (16 B/param). Activations are not included.
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


if __name__ == "__main__":
    main()
