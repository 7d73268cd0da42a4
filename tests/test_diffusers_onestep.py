"""OneStepSD on tiny random-config diffusers models built in the test (no downloads)."""

import pytest
import torch

from diffusers_helpers import assert_lora_roundtrip, assert_only_lora_changed, snapshot, tiny_sd_unet, tiny_vae, train_one_step
from sralign.policies.diffusers import OneStepSD
from sralign.policies.tiny import PolicyLoadError


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    torch.manual_seed(0)
    vae, unet = tiny_vae(), tiny_sd_unet()
    d = tmp_path_factory.mktemp("sd") / "tiny-sd"
    vae.save_pretrained(d / "vae")
    unet.save_pretrained(d / "unet")
    return d


def _lora_names(pol):
    return {n for n, p in pol.model.unet.named_parameters() if p.requires_grad}


def test_sample_size_seeds_and_reference(sd_folder):
    pol = OneStepSD.from_pretrained(sd_folder)
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = pol.condition(lr)
    n1 = torch.randn(pol.noise_shape(cond, 2), generator=torch.Generator().manual_seed(1))
    n2 = torch.randn(pol.noise_shape(cond, 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = pol.sample(cond, n1).images
        b = pol.sample(cond, n2).images
    assert a.shape == (4, 3, 32, 32)
    assert (a - b).abs().mean() > 1e-4
    assert all("lora" in n for n in _lora_names(pol)) and _lora_names(pol)
    # gaussian LoRA init has B = 0: the policy equals the base until trained; then reference() still does
    with torch.no_grad():
        base = pol.sample(cond, n1).images
        for p in pol.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
        moved = pol.sample(cond, n1).images
        with pol.reference():
            ref = pol.sample(cond, n1).images
    assert torch.equal(ref, base) and not torch.allclose(moved, base)


def test_dsm_grads_reach_lora_only_and_save_load(sd_folder, tmp_path):
    pol = OneStepSD.from_pretrained(sd_folder)
    x0 = torch.rand(2, 3, 32, 32)
    cond = pol.condition(torch.rand(2, 3, 8, 8))
    eps = torch.randn(pol.dsm_noise_shape(x0))
    d = pol.dsm(x0, cond, torch.full((2,), 0.25), eps, t_model=torch.tensor(0.1))
    assert d.shape == (2,)
    d.sum().backward()
    for n, p in pol.model.named_parameters():
        if "lora" in n and "unet" in n:
            assert p.grad is not None
        else:
            assert p.grad is None, n
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(0.05)
    assert_lora_roundtrip(pol, OneStepSD, tmp_path / "aligned")


def test_missing_files_are_named(tmp_path):
    (tmp_path / "m" / "vae").mkdir(parents=True)
    with pytest.raises(PolicyLoadError, match="missing vae/config.json"):
        OneStepSD.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("method", ["gdpo", "dgpo", "dp2o", "dpo"])
def test_one_step_of_each_method_changes_only_lora(sd_folder, tmp_path, method):
    pol = OneStepSD.from_pretrained(sd_folder)
    before = snapshot(pol)
    train_one_step(pol, method, tmp_path, sampler="onestep", steps=1)
    assert_only_lora_changed(pol, before)
    assert all(not p.requires_grad for p in pol.model.vae.parameters())


def test_load_policy_detects_diffusers_folders(sd_folder, tmp_path):
    from sralign.policies import load_policy

    pol = load_policy(str(sd_folder))
    assert isinstance(pol, OneStepSD)
    pol.save(tmp_path / "a")
    assert isinstance(load_policy(str(tmp_path / "a")), OneStepSD)


def test_dsm_encodes_a_batch_once_for_policy_and_reference(sd_folder):
    pol = OneStepSD.from_pretrained(sd_folder)
    calls = []
    pol.model.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    x0, cond = torch.rand(2, 3, 32, 32), pol.condition(torch.rand(2, 3, 8, 8))
    calls.clear()
    t, eps = torch.full((2,), 0.3), torch.randn(pol.dsm_noise_shape(x0))
    d = pol.dsm(x0, cond, t, eps)
    with torch.no_grad(), pol.reference():
        d_ref = pol.dsm(x0, cond, t, eps)
    assert len(calls) == 1 and torch.allclose(d.detach(), d_ref, atol=1e-6)  # fresh adapters (B = 0): same loss
    x0.add_(0.01)  # changed in place: encoded again
    fresh = pol.dsm(x0, cond, t, eps)
    assert len(calls) == 2
    pol._clean_latents = None
    assert torch.allclose(pol.dsm(x0, cond, t, eps), fresh)  # the cache never changes a result
