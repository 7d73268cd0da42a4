"""Per-image prompts through the backends' own text encoders (tiny random models built here)."""

import shutil

import pytest
import torch

from diffusers_helpers import FLUX_TINY, write_clip_text_encoder, write_t5_text_encoder, write_tiny_controlnet_sd, write_tiny_flux
from sralign.policies.diffusers import ControlNetSD, FluxControlNet, OneStepSD
from sralign.policies.diffusers.loading import PromptEncoder
from sralign.policies.tiny import PolicyLoadError


@pytest.fixture(scope="module")
def sd_text_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdtext") / "tiny-sd"
    write_tiny_controlnet_sd(d)
    write_clip_text_encoder(d, hidden=16)
    return d


@pytest.fixture(scope="module")
def flux_text_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("fluxtext") / "tiny-flux"
    write_tiny_flux(d)
    write_clip_text_encoder(d, hidden=FLUX_TINY["pooled_projection_dim"])
    write_t5_text_encoder(d, d_model=FLUX_TINY["joint_attention_dim"])
    return d


def _sample(pol, lr, prompts, seed=1, **kw):
    cond = pol.condition(lr, prompts=prompts)
    noise = torch.randn(pol.noise_shape(cond, 2), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pol.sample(cond, noise, **kw).images, cond


def _check_prompts_steer(pol, **kw):
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cats, cond = _sample(pol, lr, ["a photo of a cat", "a photo of a cat"], **kw)
    mixed, _ = _sample(pol, lr, ["a photo of a cat", "a brick wall"], **kw)
    default, _ = _sample(pol, lr, None, **kw)
    assert cats.shape == (4, 3, 32, 32)
    # rows 0-1 belong to image 0 (same prompt in both calls), rows 2-3 to image 1 (prompt differs)
    assert torch.allclose(cats[:2], mixed[:2], atol=1e-6)
    assert (cats[2:] - mixed[2:]).abs().mean() > 1e-5
    assert (cats - default).abs().mean() > 1e-5  # the config's prompt ("") is not "a photo of a cat"
    # the per-image embeddings reach the training loss too, and only LoRA gets gradients
    x0 = torch.rand(2, 3, 32, 32)
    loss = pol.dsm(x0, cond, torch.tensor([0.3, 0.6]), torch.randn(pol.dsm_noise_shape(x0)))
    loss.sum().backward()
    assert all(p.grad is None for n, p in pol.model.named_parameters() if "lora" not in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pol.trainable_parameters())


def test_onestep_sd_per_image_prompts(sd_text_folder):
    _check_prompts_steer(OneStepSD.from_pretrained(sd_text_folder), sampler="onestep")


def test_controlnet_sd_per_image_prompts_with_guidance(sd_text_folder):
    from sralign.policies.diffusers.controlnet_sd import ControlNetSDConfig

    pol = ControlNetSD.from_pretrained(sd_text_folder, ControlNetSDConfig(guidance_scale=3.5, negative_prompt="blurry"))
    _check_prompts_steer(pol, steps=2)


def test_flux_loads_clip_and_t5_and_takes_per_image_prompts(flux_text_folder):
    from sralign.policies.diffusers.flux_controlnet import FluxControlNetConfig

    pol = FluxControlNet.from_pretrained(flux_text_folder, FluxControlNetConfig(prompt="a sharp photo"))
    assert pol.prompt_encoder is not None
    assert pol.prompt_embeds.shape == (1, 6, 16) and pol.pooled.shape == (1, 8)  # T5 tokens × joint dim; CLIP pooled
    _check_prompts_steer(pol, steps=2)


def test_prompt_encoder_caches_and_matches_direct_encoding(sd_text_folder):
    enc = PromptEncoder(sd_text_folder, "clip")
    a = enc(["a photo of a dog", "grass"])["prompt_embeds"]
    b = enc(["grass"])["prompt_embeds"]
    assert a.shape == (2, 8, 16) and torch.equal(a[1], b[0]) and len(enc._cache) == 2
    ids = enc.tokenizer(["grass"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    assert torch.allclose(enc.text_encoder(ids).last_hidden_state, b)


def test_prompt_errors_name_the_fix(sd_text_folder, tmp_path):
    pol = OneStepSD.from_pretrained(sd_text_folder)
    lr = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="one string per LR image"):
        pol.condition(lr, prompts=["only one"])
    bare = tmp_path / "bare"
    shutil.copytree(sd_text_folder, bare, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    with pytest.raises(ValueError, match="has none"):
        OneStepSD.from_pretrained(bare).condition(lr, prompts=["a", "b"])
    with pytest.raises(PolicyLoadError, match="text_encoder_2/"):
        PromptEncoder(sd_text_folder, "flux")


def test_super_resolve_latent_backends_tiles_and_prompts(sd_text_folder, flux_text_folder):
    from sralign.inference import super_resolve
    from sralign.policies.diffusers.flux_controlnet import FluxControlNetConfig

    pol = OneStepSD.from_pretrained(sd_text_folder)
    lr = torch.rand(3, 13, 11, generator=torch.Generator().manual_seed(0))
    whole = super_resolve(pol, lr, sampler="onestep", tile=0)
    tiled = super_resolve(pol, lr, sampler="onestep", tile=6, overlap=2)
    assert whole.shape == tiled.shape == (3, 52, 44)
    assert torch.isfinite(tiled).all() and (tiled - whole).abs().mean() < 0.2  # same noise crops, seams differ
    assert torch.equal(super_resolve(pol, lr, sampler="onestep", tile=64), whole)  # one tile = no tiling
    cat = super_resolve(pol, lr, sampler="onestep", tile=0, prompt="a photo of a cat")
    assert (cat - whole).abs().mean() > 1e-5
    # FLUX at ×2: outputs must be multiples of 2·(VAE factor) = 4, so odd LR sizes are padded and cropped back
    flux = FluxControlNet.from_pretrained(flux_text_folder, FluxControlNetConfig(scale=2))
    out = super_resolve(flux, torch.rand(3, 9, 7), steps=2, tile=4, overlap=2)
    assert out.shape == (3, 18, 14) and torch.isfinite(out).all()


def test_cli_sr_reads_sidecar_prompts(sd_text_folder, tmp_path):
    from sralign.cli import main
    from sralign.data.images import load_image, save_image

    src = tmp_path / "in"
    src.mkdir()
    img = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))
    save_image(img, src / "a.png")
    save_image(img, src / "b.png")
    (src / "b.txt").write_text("a photo of a cat\n")
    args = ["sr", str(src), str(tmp_path / "out"), "--policy", "osediff", "--model-path", str(sd_text_folder),
            "--sampler", "onestep", "--quiet"]
    assert main(args) == 0
    a, b = load_image(tmp_path / "out" / "a.png"), load_image(tmp_path / "out" / "b.png")
    assert a.shape == (3, 48, 48) and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert (a - b).abs().mean() > 1e-3  # same image and seed, different prompt
    assert main(["sr", str(src / "a.png"), str(tmp_path / "o2.png"), "--prompt", "a cat", "--quiet"]) != 0


def test_captions_of_your_hr_folder_reach_every_trainer_and_eval(sd_text_folder, tmp_path):
    """HR folder with IMG.txt captions -> generate / DP²O / GDPO / eval condition each row on its caption."""
    from sralign.data.images import save_image
    from sralign.data.store import CandidateStore
    from sralign.eval.bestof import sample_groups
    from sralign.train.candidates import GenerateConfig, LRSetConfig, generate, make_lr_set, score_store
    from sralign.train.offline import OfflineTrainer
    from sralign.train.offline_config import DP2OConfig
    from sralign.train.online import OnlineTrainer
    from sralign.train.online_config import GDPOConfig

    hr = tmp_path / "hr"
    hr.mkdir()
    save_image(torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0)), hr / "cat.png")
    (hr / "cat.txt").write_text("a photo of a cat")
    save_image(torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1)), hr / "wall.png")
    lr_set = LRSetConfig(n=4, patch=32, hr_dir=str(hr))
    pol = OneStepSD.from_pretrained(sd_text_folder)
    seen = []
    inner = pol.condition

    def spy(lr, prompts=None):
        seen.append(prompts)
        return inner(lr, prompts=prompts)

    pol.condition = spy
    st = CandidateStore(tmp_path / "store", create=True)
    generate(st, pol, GenerateConfig(m=4, sampler="onestep", steps=1, lr_set=lr_set), progress=False)
    captions = {st.prompt(i) for i in st.lr_ids()}
    assert "a photo of a cat" in captions
    assert [["a photo of a cat"] if st.prompt(i) else None for i in st.lr_ids()] == seen  # one condition per LR
    score_store(st, ["psnr", "sharpness"], progress=False)
    seen.clear()
    OfflineTrainer(pol, st, DP2OConfig(steps=1, batch_pairs=4, n=1, fr_metrics=["psnr"], nr_metrics=["sharpness"]), tmp_path / "dp2o").train(progress=False)
    offline = [p for p in seen if p is not None]
    # one condition per distinct LR image of a batch (winners and losers share it), with that LR's caption
    assert offline and all(1 <= len(p) <= 4 and set(p) <= (captions | {""}) for p in offline)
    assert any("a photo of a cat" in p for p in offline)
    seen.clear()
    OnlineTrainer(pol, GDPOConfig(steps_total=2, batch_lr=2, group=2, reward="hybrid", fr_metrics=["psnr"], nr_metrics=["sharpness"],
                                  lr_set=lr_set), tmp_path / "gdpo").train(progress=False)
    assert any(p is not None and "a photo of a cat" in p for p in seen)
    seen.clear()
    items = make_lr_set(lr_set)
    sample_groups(pol, torch.stack([i.lr for i in items]), 2, sampler="onestep", steps=1, prompts=[i.prompt for i in items])
    assert seen == [["a photo of a cat"] if i.prompt else None for i in items]
