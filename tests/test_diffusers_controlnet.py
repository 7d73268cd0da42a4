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
