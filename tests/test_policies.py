
import pytest
import torch

from sralign.policies import SRPolicy, TinyPolicy
from sralign.policies.tiny import PolicyLoadError


def test_protocol_and_shapes(tiny_random_policy, lr_batch):
    p = tiny_random_policy
    assert isinstance(p, SRPolicy)
    cond = p.condition(lr_batch)
    assert cond.lr_up.shape == (2, 3, 32, 48)
    noise = torch.randn(6, 3, 32, 48)
    for sampler in ("ode", "sde", "onestep"):
        out = p.sample(cond, noise, sampler=sampler, steps=3)
        assert out.images.shape == (6, 3, 32, 48)
        assert out.images.min() >= 0 and out.images.max() <= 1
    sde = p.sample(cond, noise, sampler="sde", steps=3)
    assert sde.log_probs.shape == (6, 3) and sde.trajectory.shape == (6, 4, 3, 32, 48)
    with pytest.raises(ValueError, match="unknown sampler"):
        p.sample(cond, noise, sampler="ddim")
    with pytest.raises(ValueError, match="multiple"):
        p.sample(cond, torch.randn(3, 3, 32, 48))


def test_same_noise_same_output_and_different_noise_differs(tiny_random_policy, lr_batch):
    p = tiny_random_policy
    cond = p.condition(lr_batch)
    n1, n2 = torch.randn(2, 3, 32, 48), torch.randn(2, 3, 32, 48)
    for sampler in ("ode", "onestep"):
        a = p.sample(cond, n1, sampler=sampler, steps=4).images
        b = p.sample(cond, n1, sampler=sampler, steps=4).images
        c = p.sample(cond, n2, sampler=sampler, steps=4).images
        assert torch.equal(a, b)
        assert (a - c).abs().mean() > 1e-4


def test_group_sampling_reuses_condition(tiny_random_policy, lr_batch, monkeypatch):
    p = tiny_random_policy
    calls = {"n": 0}
    enc = p.model.encoder.forward

    def counting(x):
        calls["n"] += 1
        return enc(x)

    monkeypatch.setattr(p.model.encoder, "forward", counting)
    cond = p.condition(lr_batch)
    p.sample(cond, torch.randn(16, 3, 32, 48), sampler="ode", steps=5)
    assert calls["n"] == 1
    # a grouped sample equals sampling each LR alone with the same noise rows
    noise = torch.randn(4, 3, 32, 48)
    grouped = p.sample(cond, noise, steps=3).images
    alone = p.sample(p.condition(lr_batch[1:]), noise[2:], steps=3).images
    assert torch.allclose(grouped[2:], alone, atol=1e-5)


def test_sde_log_prob_rescoring(tiny_random_policy, lr_batch):
    p = tiny_random_policy
    cond = p.condition(lr_batch)
    torch.manual_seed(3)
    s = p.sample(cond, torch.randn(2, 3, 32, 48), sampler="sde", steps=4)
    for i in range(4):
        _, lp, _, _ = p.sde_step(cond, s.trajectory[:, i], s.sigmas, i, prev_sample=s.trajectory[:, i + 1])
        assert torch.allclose(lp, s.log_probs[:, i], atol=1e-5)
    # a transition far from the mean is less likely
    _, lp_far, _, _ = p.sde_step(cond, s.trajectory[:, 1], s.sigmas, 1, prev_sample=s.trajectory[:, 2] + 1.0)
    assert (lp_far < s.log_probs[:, 1]).all()


def test_dsm_matches_velocity_loss_and_unequal_timestep(tiny_random_policy, lr_batch):
    p = tiny_random_policy
    cond = p.condition(lr_batch)
    x0 = torch.rand(2, 3, 32, 48)
    eps = torch.randn(2, 3, 32, 48)
    t = torch.tensor([0.3, 0.7])
    d = p.dsm(x0, cond, t, eps)
    r = p.to_residual(x0, cond)
    xt = (1 - t)[:, None, None, None] * r + t[:, None, None, None] * eps
    v = p.velocity(xt, t, cond)
    assert torch.allclose(d, ((v - (eps - r)) ** 2).flatten(1).mean(1), rtol=1e-4)
    d_un = p.dsm(x0, cond, torch.full((2,), 0.25), eps, t_model=torch.tensor(0.1))
    assert d_un.shape == (2,) and torch.isfinite(d_un).all()
    assert not torch.allclose(d_un, p.dsm(x0, cond, torch.full((2,), 0.25), eps))


def test_reference_is_frozen_and_gradients_only_reach_unet(tiny_random_policy, lr_batch):
    p = tiny_random_policy
    p.freeze_reference()
    cond = p.condition(lr_batch)
    x0, eps, t = torch.rand(2, 3, 32, 48), torch.randn(2, 3, 32, 48), torch.full((2,), 0.5)
    with p.reference():
        before = p.dsm(x0, cond, t, eps)
    opt = torch.optim.SGD(p.trainable_parameters(), lr=0.5)
    p.dsm(x0, cond, t, eps).mean().backward()
    assert all(q.grad is None for q in p.model.encoder.parameters())
    opt.step()
    with p.reference():
        after = p.dsm(x0, cond, t, eps)
    assert torch.equal(before, after)
    assert not torch.allclose(p.dsm(x0, cond, t, eps), before)


def test_save_load_roundtrip(tiny_random_policy, lr_batch, tmp_path):
    p = tiny_random_policy
    p.freeze_reference()
    with torch.no_grad():
        next(p.trainable_parameters()).add_(1.0)
    p.save(tmp_path / "ck")
    q = TinyPolicy.from_pretrained(tmp_path / "ck")
    cond_p, cond_q = p.condition(lr_batch), q.condition(lr_batch)
    noise = torch.randn(2, 3, 32, 48)
    assert torch.equal(p.sample(cond_p, noise, steps=2).images, q.sample(cond_q, noise, steps=2).images)
    with p.reference(), q.reference():
        assert torch.equal(p.sample(cond_p, noise, steps=2).images, q.sample(cond_q, noise, steps=2).images)
    assert p.fingerprint() == q.fingerprint()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(PolicyLoadError, match="no config.json"):
        TinyPolicy.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"type": "tiny", "policy": {}}')
    with pytest.raises(PolicyLoadError, match="missing weights file model.safetensors"):
        TinyPolicy.from_pretrained(tmp_path)


def test_odd_sizes_are_padded(tiny_random_policy):
    p = tiny_random_policy
    cond = p.condition(torch.rand(1, 3, 9, 11))
    out = p.sample(cond, torch.randn(1, 3, 36, 44), steps=2)
    assert out.images.shape == (1, 3, 36, 44)
