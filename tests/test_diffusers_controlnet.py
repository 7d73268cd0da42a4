"""ControlNetSD on tiny random-config diffusers models built in the test (no downloads)."""

import pytest
import torch

from diffusers_helpers import assert_lora_roundtrip, assert_only_lora_changed, snapshot, train_one_step, write_tiny_controlnet_sd
from sralign.policies.diffusers import ControlNetSD


@pytest.fixture(scope="module")
def cn_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("cn") / "tiny-cn"
    write_tiny_controlnet_sd(d)
    return d


@pytest.fixture(scope="module")
def cn_text_folder(tmp_path_factory):
    """With a text encoder: C-SD2's preset configures a negative prompt, which needs one."""
    from diffusers_helpers import write_clip_text_encoder

    d = tmp_path_factory.mktemp("cntext") / "tiny-cn"
    write_tiny_controlnet_sd(d)
    write_clip_text_encoder(d, hidden=16)
    return d


def test_samplers_sizes_seeds_logprobs_and_reference(cn_folder):
    pol = ControlNetSD.from_pretrained(cn_folder)
    cond = pol.condition(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    n1 = torch.randn(pol.noise_shape(cond, 2), generator=torch.Generator().manual_seed(1))
    n2 = torch.randn(pol.noise_shape(cond, 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = pol.sample(cond, n1, steps=3).images
        b = pol.sample(cond, n2, steps=3).images
        s = pol.sample(cond, n1, sampler="sde", steps=3, generator=torch.Generator().manual_seed(0))
        # log-probs re-score the stored transitions
        c2 = cond.repeat(2)
        for i in range(3):
            _, lp, _, std = pol.sde_step(c2, s.trajectory[:, i], s.sigmas, i, prev_sample=s.trajectory[:, i + 1])
            assert float(std) > 0 and torch.allclose(lp, s.log_probs[:, i], atol=1e-4)
        base = a
        for p in pol.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
        moved = pol.sample(cond, n1, steps=3).images
        with pol.reference():
            ref = pol.sample(cond, n1, steps=3).images
    assert a.shape == (2, 3, 32, 32) and s.images.shape == (2, 3, 32, 32) and s.log_probs.shape == (2, 3)
    assert (a - b).abs().mean() > 1e-4
    assert torch.equal(ref, base) and not torch.allclose(moved, base)
    with pytest.raises(ValueError, match="'ode', 'sde', 'ddpm'"):
        pol.sample(cond, n1, sampler="onestep")


def test_cfg_changes_output_and_lora_save_load(cn_folder, tmp_path):
    from sralign.policies.diffusers import ControlNetSDConfig

    pol = ControlNetSD.from_pretrained(cn_folder, ControlNetSDConfig(lora_on_controlnet=True))
    pol.prompt_embeds = torch.randn_like(pol.prompt_embeds)
    cond = pol.condition(torch.rand(1, 3, 8, 8))
    n = torch.randn(pol.noise_shape(cond))
    with torch.no_grad():
        g1 = pol.sample(cond, n, steps=2).images
        pol.config.guidance_scale = 3.5
        g35 = pol.sample(cond, n, steps=2).images
        for p in pol.trainable_parameters():
            p.add_(0.05)
    assert not torch.allclose(g1, g35)
    assert any(k.startswith("controlnet.") for k in pol._lora_state())
    x0 = torch.rand(1, 3, 32, 32)
    d = pol.dsm(x0, cond, torch.tensor([0.5]), torch.randn(pol.dsm_noise_shape(x0)))
    d.sum().backward()
    assert all(("lora" in nme) == (p.grad is not None) for nme, p in pol.model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for nme, p in pol.model.named_parameters() if "lora" not in nme)
    assert_lora_roundtrip(pol, ControlNetSD, tmp_path / "a")


@pytest.mark.parametrize("method", ["dgpo", "grpo", "dp2o", "dpo"])
def test_one_step_of_each_method_changes_only_lora(cn_folder, tmp_path, method):
    pol = ControlNetSD.from_pretrained(cn_folder)
    before = snapshot(pol)
    train_one_step(pol, method, tmp_path)
    assert_only_lora_changed(pol, before)


def test_load_policy_detects_controlnet_folders(cn_folder, tmp_path):
    from sralign.policies import load_policy

    pol = load_policy(str(cn_folder))
    assert isinstance(pol, ControlNetSD)
    pol.save(tmp_path / "a")
    assert isinstance(load_policy(str(tmp_path / "a")), ControlNetSD)


def test_ddpm_sampler_logprobs_and_final_step(cn_folder):
    """Ancestral DDPM on the folder's grid: the stored transitions re-score to the sampled
    log-probs; the last step (onto ᾱ = 1) is deterministic; same generator, same image."""
    pol = ControlNetSD.from_pretrained(cn_folder)
    cond = pol.condition(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    n = torch.randn(pol.noise_shape(cond, 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = pol.sample(cond, n, sampler="ddpm", steps=3, generator=torch.Generator().manual_seed(0))
        again = pol.sample(cond, n, sampler="ddpm", steps=3, generator=torch.Generator().manual_seed(0)).images
        other = pol.sample(cond, n, sampler="ddpm", steps=3, generator=torch.Generator().manual_seed(9)).images
        c2 = cond.repeat(2)
        stds = []
        for i in range(3):
            _, lp, _, std = pol.sde_step(c2, s.trajectory[:, i], s.sigmas, i, prev_sample=s.trajectory[:, i + 1], noise_level=0.3)
            assert torch.allclose(lp, s.log_probs[:, i], atol=1e-4)  # noise_level does not touch a DDPM step
            stds.append(float(std))
    # SD2's default grid (leading, offset 1): 667, 334, 1, then the clean end
    assert s.sigmas[:, 0].tolist() == [667, 334, 1, -1] and s.sigmas[:, 2].eq(1).all()
    assert stds[0] > 0 and stds[1] > 0 and stds[2] == 0 and torch.equal(s.log_probs[:, 2], torch.zeros(2))
    assert torch.equal(s.images, again) and (s.images - other).abs().mean() > 1e-4


def test_v_prediction_sampling_and_dsm_target(cn_folder, tmp_path):
    """A v-prediction scheduler config changes sampling, and dsm regresses diffusers' own velocity
    target (DDPMScheduler.get_velocity)."""
    import json

    from diffusers import DDPMScheduler

    vfolder = tmp_path / "v"
    vfolder.mkdir()
    for sub in ("vae", "unet", "controlnet"):
        (vfolder / sub).symlink_to(cn_folder / sub)
    (vfolder / "scheduler").mkdir()
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
               set_alpha_to_one=False, prediction_type="v_prediction")
    (vfolder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    eps_pol, v_pol = ControlNetSD.from_pretrained(cn_folder), ControlNetSD.from_pretrained(vfolder)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = v_pol.condition(lr)
    n = torch.randn(v_pol.noise_shape(cond), generator=torch.Generator().manual_seed(1))
    x0 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(v_pol.dsm_noise_shape(x0), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (v_pol.sample(cond, n, steps=2).images - eps_pol.sample(eps_pol.condition(lr), n, steps=2).images).abs().mean() > 1e-4
        d = v_pol.dsm(x0, cond, torch.tensor([0.4]), eps)
        z0 = v_pol._encode(x0)
        sch = DDPMScheduler.from_config(cfg)
        t = torch.tensor([400])
        target = sch.get_velocity(z0, eps, t)
        out = v_pol._model_out(sch.add_noise(z0, eps, t), t, cond.features, guidance=1.0)
    assert torch.allclose(d, ((out - target) ** 2).flatten(1).mean(1), rtol=1e-5, atol=1e-7)


def test_pil_bicubic_upsampling_is_keys_a_minus_half():
    """``resize="pil-bicubic"``: the 8-bit LR resized with PIL's bicubic, whose cubic has A = −0.5
    (torch's A = −0.75 gives other values); checked by hand at interior output pixels."""
    from sralign.policies.diffusers.upsample import upsample

    g = torch.Generator().manual_seed(0)
    lr = torch.randint(0, 256, (1, 3, 6, 6), generator=g).float() / 255
    up = upsample(lr, 4, "pil-bicubic")

    def keys(x: float, a: float = -0.5) -> float:
        x = abs(x)
        return (a + 2) * x**3 - (a + 3) * x**2 + 1 if x < 1 else (a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0)

    def by_hand(c: int, oy: int, ox: int) -> float:
        sy, sx = (oy + 0.5) / 4 - 0.5, (ox + 0.5) / 4 - 0.5  # output pixel centre in input coordinates
        y0, x0 = int(sy // 1), int(sx // 1)
        v = sum(keys(sy - y) * keys(sx - x) * float(lr[0, c, y, x]) for y in range(y0 - 1, y0 + 3) for x in range(x0 - 1, x0 + 3))
        return v

    for c, oy, ox in [(0, 9, 10), (1, 12, 13), (2, 14, 9), (0, 10, 14)]:
        assert abs(float(up[0, c, oy, ox]) - by_hand(c, oy, ox)) <= 1 / 255 + 1e-6
    torch_up = upsample(lr, 4, "bicubic")
    assert up.shape == torch_up.shape == (1, 3, 24, 24)
    assert float((up - torch_up)[..., 8:16, 8:16].abs().max()) > 2 / 255


def test_c_sd2_preset_settings_precedence_and_errors(cn_text_folder, tmp_path, capsys):
    """--preset c-sd2 sets the paper's values; YAML beats the preset, policy.KEY=VALUE beats YAML,
    --dtype beats all; an unknown key or a preset on the tiny policy is a one-line error."""
    from sralign.cli import main
    from sralign.data.images import save_image
    from sralign.policies.diffusers.presets import load_policy_with_settings

    yml = tmp_path / "policy.yaml"
    yml.write_text("guidance_scale: 5.0\ncontrolnet_scale: 0.5\n")
    pol = load_policy_with_settings(None, str(cn_text_folder), preset="c-sd2", policy_config=str(yml), overrides=["guidance_scale=2.0"], dtype="fp32")
    c = pol.config
    assert (c.guidance_scale, c.controlnet_scale, c.dtype) == (2.0, 0.5, "fp32")
    assert (c.negative_prompt, c.resize, c.vae_dtype) == ("dotted, noise, blur, lowres, smooth", "pil-bicubic", "fp32")
    saved = tmp_path / "aligned"
    pol.save(saved)  # an aligned policy folder takes settings too, on top of its saved config
    again = load_policy_with_settings(str(saved), overrides=["sde_noise_level=0.3"])
    assert (again.config.guidance_scale, again.config.sde_noise_level) == (2.0, 0.3)

    lr = tmp_path / "lr.png"
    save_image(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)), lr)
    out = tmp_path / "sr.png"
    assert main(["sr", str(lr), str(out), "--preset", "c-sd2", "--model-path", str(cn_text_folder), "--steps", "2", "--dtype", "fp32",
                 "--quiet", "policy.guidance_scale=2.0"]) == 0
    from sralign.data.images import load_image

    assert load_image(out).shape == (3, 32, 32)
    capsys.readouterr()
    assert main(["sr", str(lr), str(tmp_path / "x.png"), "--preset", "c-sd2", "--model-path", str(cn_text_folder), "policy.guidance=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "guidance" in err and "valid keys" in err and "guidance_scale" in err and len(err.splitlines()) == 1
    assert main(["sr", str(lr), str(tmp_path / "y.png"), "--preset", "c-sd2"]) == 2
    assert "tiny policy" in capsys.readouterr().err
    assert main(["sr", str(lr), str(tmp_path / "z.png"), "--preset", "nope", "--model-path", str(cn_text_folder)]) == 2
    assert "c-sd2" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_generate_with_preset_samples_ddpm(cn_text_folder, tmp_path):
    """generate --preset c-sd2 takes the preset's sampler (ddpm) unless a flag says otherwise;
    the same seed gives the same candidate (the per-step noise is seeded)."""
    from sralign.cli import main
    from sralign.data.store import CandidateStore

    args = ["generate", "--preset", "c-sd2", "--model-path", str(cn_text_folder), "--dtype", "fp32", "--m", "2", "--steps", "2",
            "--n-lr", "1", "--quiet", "lr_set.patch=32", "policy.guidance_scale=1.0"]
    assert main([*args, "--store", str(tmp_path / "a")]) == 0
    assert main([*args, "--store", str(tmp_path / "b")]) == 0
    rows_a, rows_b = CandidateStore(tmp_path / "a").rows(), CandidateStore(tmp_path / "b").rows()
    assert len(rows_a) == 2 and all(r[2] == "ddpm" and r[3] == 2 for r in rows_a)
    assert [r[-1] for r in rows_a] == [r[-1] for r in rows_b] and rows_a[0][-1] != rows_a[1][-1]


def test_presets_registry_and_cli_sampler_choices():
    import dataclasses

    from sralign.cli import SAMPLER_CHOICES
    from sralign.policies import SAMPLERS
    from sralign.policies.diffusers import ControlNetSDConfig, FluxControlNetConfig, OneStepSDConfig
    from sralign.policies.diffusers.presets import all_presets, presets_table

    p = all_presets()
    assert sorted(p) == ["c-flux", "c-sd2", "gdpo-sr", "osediff"] and list(SAMPLERS) == SAMPLER_CHOICES
    assert (p["c-sd2"].sampler, p["c-sd2"].steps, p["c-sd2"].config["guidance_scale"]) == ("ddpm", 50, 3.5)
    assert (p["osediff"].config["t_noise"], p["osediff"].config["t_diff"]) == (0.0, 0.999)
    assert (p["gdpo-sr"].config["t_noise"], p["gdpo-sr"].config["t_diff"]) == (0.25, 0.10)
    assert p["gdpo-sr"].text("cat, grass", None) == "cat, grass, clean, high-resolution, 8k,"
    fields = {"controlnet-sd": ControlNetSDConfig, "flux": FluxControlNetConfig, "osediff": OneStepSDConfig}
    ckpt_fields = {"dtype", "vae_dtype", "gradient_checkpointing"}  # OneStepSD's arrive with the importers' branch
    for name, pre in p.items():
        assert set(pre.config) <= {f.name for f in dataclasses.fields(fields[pre.backend])} | ckpt_fields, name
        assert f"`{name}`" in presets_table()


def test_grpo_trains_on_ddpm_rollouts(cn_folder, tmp_path):
    """GRPO with sampler=ddpm rolls out C-SD2's ancestral sampler and trains the LoRA on its
    stochastic steps (the deterministic last step carries no gradient)."""
    from diffusers_helpers import METRICS
    from sralign.train.candidates import LRSetConfig
    from sralign.train.online import OnlineTrainer
    from sralign.train.online_config import GRPOConfig

    pol = ControlNetSD.from_pretrained(cn_folder)
    before = snapshot(pol)
    seen = []
    sample = pol.sample
    pol.sample = lambda *a, **k: seen.append(k.get("sampler")) or sample(*a, **k)
    cfg = GRPOConfig(steps=2, sampler="ddpm", clip_range=0.2, steps_total=1, batch_lr=1, group=3, rollout_from="policy", **METRICS)
    cfg.lr_set = LRSetConfig(n=2, patch=32)
    OnlineTrainer(pol, cfg, tmp_path / "grpo").train(progress=False)
    assert seen == ["ddpm"]
    assert_only_lora_changed(pol, before)
