"""Shared pieces of the diffusers backend tests: tiny random models and one training step."""

import torch

from sralign.data.store import CandidateStore
from sralign.train.candidates import GenerateConfig, LRSetConfig, generate, score_store
from sralign.train.offline import OfflineTrainer
from sralign.train.offline_config import DP2OConfig
from sralign.train.online import OnlineTrainer
from sralign.train.online_config import DGPOConfig, GDPOConfig, GRPOConfig

METRICS = dict(fr_metrics=["psnr"], nr_metrics=["sharpness"], lr=1e-2)


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=latent_channels,
                         norm_num_groups=8, layers_per_block=1, sample_size=32)


def tiny_sd_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)


FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=[2, 2, 4])


def _give_voice(controlnet) -> None:
    """A ControlNet fresh from its init has zero output convs, which would hide the control path."""
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.01 * torch.randn_like(p))


def write_tiny_controlnet_sd(folder) -> None:
    """``vae/ unet/ controlnet/`` of a tiny SD-style ControlNet model (seeded)."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    vae, unet = tiny_vae(), tiny_sd_unet()
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    _give_voice(cn)
    vae.save_pretrained(folder / "vae")
    unet.save_pretrained(folder / "unet")
    cn.save_pretrained(folder / "controlnet")


def write_tiny_flux(folder) -> None:
    """``vae/ transformer/ controlnet/`` of a tiny FLUX ControlNet model (seeded)."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    torch.manual_seed(0)
    vae = tiny_vae()
    tr = FluxTransformer2DModel(**FLUX_TINY)
    cn = FluxControlNetModel(**dict(FLUX_TINY, num_single_layers=0))
    _give_voice(cn)
    vae.save_pretrained(folder / "vae")
    tr.save_pretrained(folder / "transformer")
    cn.save_pretrained(folder / "controlnet")


def train_one_step(pol, method: str, tmp_path, sampler: str = "ode", steps: int = 2) -> None:
    """One optimiser step of ``method`` on ``pol`` with tiny data (online or offline)."""
    if method in ("gdpo", "dgpo", "grpo"):
        # DGPO rolls out from the EMA of the LoRA adapters (its default), the others from the policy
        common = dict(steps_total=1, batch_lr=1, group=3, rollout_from="ema" if method == "dgpo" else "policy", **METRICS)
        if method == "gdpo":
            cfg = GDPOConfig(reward="hybrid", **common)
        elif method == "dgpo":
            cfg = DGPOConfig(sampler=sampler, steps=steps, **common)
        else:
            cfg = GRPOConfig(steps=steps, clip_range=0.2, **common)
        cfg.lr_set = LRSetConfig(n=2, patch=32)
        OnlineTrainer(pol, cfg, tmp_path / method).train(progress=False)
        assert_checkpoint_holds_lora_only(tmp_path / method / "checkpoint", ("trained.", "ema."))
    else:
        st = CandidateStore(tmp_path / "store")
        generate(st, pol, GenerateConfig(m=4, sampler=sampler, steps=steps, lr_set=LRSetConfig(n=2, patch=32)), progress=False)
        score_store(st, ["psnr", "sharpness"], progress=False)
        cfg = DP2OConfig(method=method, steps=1, batch_pairs=2, n=1, **METRICS)
        OfflineTrainer(pol, st, cfg, tmp_path / "run").train(progress=False)
        assert_checkpoint_holds_lora_only(tmp_path / "run" / "checkpoint", ("trained.",))


def assert_checkpoint_holds_lora_only(folder, prefixes) -> None:
    """A training checkpoint of a LoRA backend stores adapters (and their optimizer state), never
    the frozen base model."""
    from safetensors.torch import load_file

    names = list(load_file(str(folder / "state.safetensors")))
    for pre in prefixes:
        mine = [n for n in names if n.startswith(pre)]
        assert mine and all("lora" in n for n in mine), mine[:3]
    assert all(n.startswith((*prefixes, "opt.")) for n in names), [n for n in names if not n.startswith(prefixes)][:3]


def snapshot(pol) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pol.model.named_parameters()}


def assert_only_lora_changed(pol, before) -> None:
    after = dict(pol.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora" in n for n in changed), sorted(changed)[:5]


def assert_lora_roundtrip(pol, cls, folder) -> None:
    """save -> from_pretrained gives the same LoRA weights."""
    pol.save(folder)
    q = cls.from_pretrained(folder)
    sa, sb = pol._lora_state(), q._lora_state()
    assert sa and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


WORDS = ["a", "photo", "of", "cat", "dog", "sharp", "blurry", "brick", "wall", "grass"]


def write_tokenizer(folder, max_length: int = 8) -> None:
    """A word-level tokenizer over a few words (built here: no tokenizer files are downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=max_length).save_pretrained(folder)


def write_clip_text_encoder(folder, hidden: int) -> None:
    """``tokenizer/`` + ``text_encoder/`` (a 1-layer CLIP text model of width ``hidden``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    write_tokenizer(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS) + 2, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=8, projection_dim=hidden)).save_pretrained(folder / "text_encoder")


def write_t5_text_encoder(folder, d_model: int) -> None:
    """``tokenizer_2/`` + ``text_encoder_2/`` (a 1-layer T5 encoder of width ``d_model``)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    write_tokenizer(folder / "tokenizer_2", max_length=6)
    T5EncoderModel(T5Config(vocab_size=len(WORDS) + 2, d_model=d_model, d_kv=4, d_ff=2 * d_model, num_layers=1,
                            num_heads=2)).save_pretrained(folder / "text_encoder_2")


# ----------------------------------------------------------------------------- published formats
def tiny_vae8():
    """A tiny 4-level VAE: latents 1/8 of the image, as SD's (what ControlNetModel.from_unet's
    default conditioning embedding assumes)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                         norm_num_groups=8, layers_per_block=1, sample_size=32)


def write_sd_base(folder, vae=None, text: bool = True, seed: int = 0) -> None:
    """A tiny SD-2-base-like folder: vae/ unet/ scheduler/ (scaled-linear DDPM) and, with ``text``,
    tokenizer/ + text_encoder/ (CLIP of the UNet's cross-attention width) and model_index.json."""
    import json

    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    (vae or tiny_vae()).save_pretrained(folder / "vae")
    unet = tiny_sd_unet()
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, steps_offset=1).save_pretrained(folder / "scheduler")
    if text:
        write_clip_text_encoder(folder, unet.config.cross_attention_dim)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))


def osediff_unet_targets(unet) -> dict[str, list[str]]:
    """OSEDiff's three UNet adapters as its paper/code describe them (own words): LoRA on every
    convolution and on the attention (to_q/k/v/out), projection (proj_in/out) and feed-forward
    (ff.net.0.proj, ff.net.2) layers; ``default_encoder`` = down_blocks + conv_in,
    ``default_decoder`` = up_blocks + conv_out, ``default_others`` = the rest (mid block)."""
    lin = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    out = {"default_encoder": [], "default_decoder": [], "default_others": []}
    for name, m in unet.named_modules():
        if not (isinstance(m, torch.nn.Conv2d) or (isinstance(m, torch.nn.Linear) and name.endswith(lin))):
            continue
        if name.startswith("down_blocks") or name == "conv_in":
            out["default_encoder"].append(name)
        elif name.startswith("up_blocks") or name == "conv_out":
            out["default_decoder"].append(name)
        else:
            out["default_others"].append(name)
    return out


def osediff_vae_targets(vae) -> list[str]:
    """OSEDiff's VAE-encoder adapter: every convolution and attention projection of the encoder, and quant_conv."""
    lin = ("to_q", "to_k", "to_v", "to_out.0")
    return [n for n, m in vae.named_modules() if (n.startswith("encoder.") and (isinstance(m, torch.nn.Conv2d) or
            (isinstance(m, torch.nn.Linear) and n.endswith(lin)))) or n == "quant_conv"]


def write_osediff_pkl(base, path, seed: int = 0, rank: int = 4):
    """An ``osediff.pkl`` laid out as OSEDiff's ``save_model`` writes it (torch.save of a dict:
    target lists, ranks, UNet LoRA + full conv_in, VAE LoRA), random trained-looking weights.
    Returns (unet, vae) with the adapters active, loaded from ``base`` through diffusers + peft
    directly (the reference)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    ut, vt = osediff_unet_targets(unet), osediff_vae_targets(vae)
    for a, t in ut.items():  # peft's default lora_alpha (8) as OSEDiff left it
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=8, init_lora_weights="gaussian", target_modules=t), adapter_name=a)
    unet.set_adapter(list(ut))
    vae.add_adapter(LoraConfig(r=rank, lora_alpha=8, init_lora_weights="gaussian", target_modules=vt), adapter_name="default_encoder")
    vae.set_adapter(["default_encoder"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (unet, vae):
            for n, p in m.named_parameters():
                if "lora" in n or (m is unet and "conv_in" in n):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    ck = {"vae_lora_encoder_modules": vt, "unet_lora_encoder_modules": ut["default_encoder"],
          "unet_lora_decoder_modules": ut["default_decoder"], "unet_lora_others_modules": ut["default_others"],
          "rank_unet": rank, "rank_vae": rank,
          "state_dict_unet": {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
          "state_dict_vae": {k: v.clone() for k, v in vae.state_dict().items() if "lora" in k}}
    torch.save(ck, path)
    return unet.eval(), vae.eval()


def encode_empty_prompt(folder) -> torch.Tensor:
    """The CLIP embedding [1,L,D] of "" with a folder's own tokenizer + text encoder (as the authors feed it)."""
    from transformers import AutoTokenizer, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return te(ids).last_hidden_state
