import math

import pytest
import torch
import torch.nn.functional as F

from sralign.losses import (
    dgpo_loss, dp2o_pairs, dpo_loss, gdpo_loss, group_advantages, group_shared_noise,
    group_shared_timesteps, grpo_loss, hpo_weights, timestep_weight, uniform_timesteps,
)

D = torch.float64


def t(*x):
    return torch.tensor(x, dtype=D)


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_hand_computed():
    r = t(1.0, 2.0, 3.0)[None]
    a = group_advantages(r, eps=0.0)  # mean 2, unbiased std 1
    assert torch.allclose(a, t(-1.0, 0.0, 1.0)[None])
    a_b = group_advantages(r, eps=0.0, unbiased=False)  # std sqrt(2/3)
    assert torch.allclose(a_b, t(-1, 0, 1)[None] / math.sqrt(2 / 3))


def test_group_advantages_zero_variance_and_single_member():
    r = torch.stack([t(0.3, 0.3, 0.3, 0.3), t(1, 2, 3, 4)])
    a = group_advantages(r)
    assert torch.equal(a[0], torch.zeros(4, dtype=D))
    assert torch.isfinite(a).all() and a[1].abs().sum() > 0
    assert torch.equal(group_advantages(t(5.0)[None]), torch.zeros(1, 1, dtype=D))


def test_group_advantages_rejects_nan():
    with pytest.raises(ValueError, match="group 0, member 1"):
        group_advantages(t(1.0, float("nan"))[None])


def test_group_advantages_clip():
    r = torch.zeros(1, 100, dtype=D)
    r[0, 0] = 1000.0
    assert group_advantages(r, clip=5.0).max() == 5.0


@pytest.mark.parametrize("seed", range(5))
def test_dgpo_positive_and_negative_abs_weights_balance(seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(4, 7, generator=g, dtype=D) ** 3
    a = group_advantages(r)
    pos = (a * (a > 0)).abs().sum(1)
    neg = (a * (a <= 0)).abs().sum(1)
    assert torch.allclose(pos, neg, atol=1e-10)


# ----------------------------------------------------------------------------- DPO
def test_dpo_hand_computed():
    loss, st = dpo_loss(t(0.10), t(0.12), t(0.20), t(0.18), beta=100.0)
    # inside = -0.5*100*((0.10-0.12)-(0.20-0.18)) = 2
    assert torch.allclose(loss, torch.log1p(torch.exp(t(-2.0))).squeeze())
    assert st["implicit_acc"] == 1.0
    assert torch.allclose(st["reward_margin"], t(0.02).squeeze())


def test_dpo_swap_is_mirror_and_beta_zero_is_log2():
    g = torch.Generator().manual_seed(0)
    dw, drw, dl, drl = (torch.rand(8, generator=g, dtype=D) for _ in range(4))
    l1, s1 = dpo_loss(dw, drw, dl, drl, beta=50.0)
    l2, s2 = dpo_loss(dl, drl, dw, drw, beta=50.0)
    inside = -0.5 * 50 * ((dw - drw) - (dl - drl))
    assert torch.allclose(l1, F.softplus(-inside).mean())
    assert torch.allclose(l2, F.softplus(inside).mean())
    assert torch.allclose(l1 - l2, -inside.mean())
    assert torch.allclose(s1["implicit_acc"] + s2["implicit_acc"], torch.tensor(1.0))
    l0, _ = dpo_loss(dw, drw, dl, drl, beta=0.0)
    assert torch.allclose(l0, torch.tensor(math.log(2), dtype=D))


def test_dpo_weighted_mean():
    l_each = [dpo_loss(t(x), t(0.0), t(0.0), t(0.0), beta=1.0)[0] for x in (1.0, -1.0)]
    lw, _ = dpo_loss(t(1.0, -1.0), t(0, 0), t(0, 0), t(0, 0), beta=1.0, weight=t(3.0, 1.0))
    assert torch.allclose(lw, (3 * l_each[0] + l_each[1]) / 4)


# ----------------------------------------------------------------------------- DP²O
def test_dp2o_pairs_count_and_order():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(16, generator=g)
    iw, il = dp2o_pairs(r, 4)
    assert iw.numel() == il.numel() == 16
    assert (r[iw].min() > r[il].max())
    assert len(set(zip(iw.tolist(), il.tolist()))) == 16
    top = set(torch.topk(r, 4).indices.tolist())
    assert set(iw.tolist()) == top


def test_dp2o_pairs_validates_n():
    with pytest.raises(ValueError, match="2N <= M"):
        dp2o_pairs(torch.rand(6), 4)


def test_hpo_weights_hand_computed():
    # group 0: gaps 0.5, 0.3 -> mu 0.4 -> w_intra 1.1, 0.9 ; group 1: gap 0.2 -> 1.0
    r_w, r_l = t(0.9, 0.8, 0.6), t(0.4, 0.5, 0.4)
    gp = torch.tensor([0, 0, 1])
    std = t(0.3, 0.1)  # mu 0.2 -> w_inter 1.1, 0.9
    w = hpo_weights(r_w, r_l, gp, std)
    assert torch.allclose(w, t(1.1 * 1.1, 0.9 * 1.1, 1.0 * 0.9))


def test_hpo_weights_reduce_to_one_and_nonnegative():
    w = hpo_weights(t(0.8, 0.7, 0.9), t(0.5, 0.4, 0.6), torch.tensor([0, 0, 1]), t(0.2, 0.2))
    assert torch.allclose(w, torch.ones(3, dtype=D))
    g = torch.Generator().manual_seed(3)
    rw, rl = torch.rand(50, generator=g, dtype=D), torch.rand(50, generator=g, dtype=D)
    w = hpo_weights(torch.maximum(rw, rl) * 5, torch.minimum(rw, rl) - 3, torch.randint(0, 5, (50,), generator=g), torch.rand(5, generator=g, dtype=D) * 4)
    assert (w >= 0).all()


# ----------------------------------------------------------------------------- GDPO / DGPO
def _group_data(seed=0, n=3, G=6):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, G, generator=g, dtype=D) * 0.1
    d_ref = d + 1e-3 * torch.randn(n, G, generator=g, dtype=D)
    adv = group_advantages(torch.randn(n, G, generator=g, dtype=D))
    return d, d_ref, adv


def test_gdpo_hand_computed():
    d, d_ref = t(0.10, 0.20)[None], t(0.11, 0.19)[None]
    adv = t(1.0, -1.0)[None]
    loss, st = gdpo_loss(d, d_ref, adv, beta=100.0)
    inside = -0.5 * 100 * (1 * (-0.01) + -1 * 0.01)  # = 1
    assert torch.allclose(loss, F.softplus(torch.tensor(-inside, dtype=D)))
    assert st["implicit_acc"] == 1.0


def test_dgpo_hand_computed():
    d, d_ref = t(0.10, 0.20, 0.30)[None], t(0.12, 0.20, 0.27)[None]
    adv = t(1.0, 0.5, -1.5)[None]
    loss, _ = dgpo_loss(d, d_ref, adv, beta=30.0, lambda_t=2.0)
    # Σ_{A>0}|A|Δ − Σ_{A≤0}|A|Δ = 1(-0.02)+0.5(0) − 1.5(0.03) = −0.065 ; logits = 2·30·(−0.065)/3
    logits = 2 * 30 * (-0.065) / 3
    assert torch.allclose(loss, F.softplus(torch.tensor(logits, dtype=D)))


@pytest.mark.parametrize("fn", ["gdpo", "dgpo"])
def test_group_losses_constant_shift_invariance(fn):
    d, d_ref, adv = _group_data()
    shift = t(0.3, -0.2, 1.5)[:, None]
    f = (lambda *a: gdpo_loss(*a, beta=500.0)[0]) if fn == "gdpo" else (lambda *a: dgpo_loss(*a, beta=500.0)[0])
    assert torch.allclose(f(d, d_ref, adv), f(d + shift, d_ref, adv), atol=1e-12)


@pytest.mark.parametrize("fn", ["gdpo", "dgpo", "dgpo_weighted"])
def test_zero_variance_groups_give_zero_gradient(fn):
    d, d_ref, _ = _group_data()
    r = torch.stack([t(1, 1, 1, 1, 1, 1), t(0, 1, 2, 3, 4, 5), t(2, 2, 2, 2, 2, 2)])
    adv = group_advantages(r)
    d = d.clone().requires_grad_(True)
    if fn == "gdpo":
        loss, _ = gdpo_loss(d, d_ref, adv, beta=500.0)
    else:
        loss, _ = dgpo_loss(d, d_ref, adv, beta=500.0, form="exact" if fn == "dgpo" else "weighted")
    loss.backward()
    assert torch.isfinite(d.grad).all()
    assert torch.equal(d.grad[0], torch.zeros(6, dtype=D)) and torch.equal(d.grad[2], torch.zeros(6, dtype=D))
    assert d.grad[1].abs().sum() > 0


def test_single_member_groups_no_nan():
    d = torch.rand(4, 1, dtype=D, requires_grad=True)
    adv = group_advantages(torch.rand(4, 1, dtype=D))
    for loss in (gdpo_loss(d, d.detach(), adv, 5000.0)[0], dgpo_loss(d, d.detach(), adv, 5000.0)[0]):
        (g,) = torch.autograd.grad(loss, d)
        assert torch.isfinite(g).all() and g.abs().sum() == 0


def test_dgpo_weighted_form_gradient_matches_exact_direction():
    d, d_ref, adv = _group_data(n=1)
    d1 = d.clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(dgpo_loss(d1, d_ref, adv, beta=50.0)[0], d1)
    (g_w,) = torch.autograd.grad(dgpo_loss(d1, d_ref, adv, beta=50.0, form="weighted")[0], d1)
    # exact: σ(x)·β/G·A ; weighted: σ(x)·A/(n·G) -> ratio β
    assert torch.allclose(g_exact, g_w * 50.0, rtol=1e-9)


def test_dgpo_lambda_per_group():
    d, d_ref, adv = _group_data(n=2)
    l_vec, _ = dgpo_loss(d, d_ref, adv, beta=10.0, lambda_t=t(1.0, 3.0))
    l0, _ = dgpo_loss(d[:1], d_ref[:1], adv[:1], beta=10.0, lambda_t=1.0)
    l1, _ = dgpo_loss(d[1:], d_ref[1:], adv[1:], beta=10.0, lambda_t=3.0)
    assert torch.allclose(l_vec, (l0 + l1) / 2)


# ----------------------------------------------------------------------------- GRPO
def test_grpo_hand_computed_and_clip():
    logp, old = t(0.0, 0.5), t(0.0, 0.0)
    adv = t(1.0, 1.0)
    loss, st = grpo_loss(logp, old, adv, clip_range=0.2)
    # sample 1: ratio 1 -> -1 ; sample 2: ratio e^.5=1.6487 -> max(-1.6487, -1.2) = -1.2
    assert torch.allclose(loss, t(-1.1).squeeze())
    assert st["clip_frac"] == 0.5
    l_kl, st2 = grpo_loss(logp, old, adv, clip_range=0.2, kl=t(0.5, 1.5), kl_beta=0.1)
    assert torch.allclose(l_kl, t(-1.1 + 0.1).squeeze()) and torch.allclose(st2["kl"], t(1.0).squeeze())


def test_grpo_advantage_clamp_and_steps_broadcast():
    logp = torch.zeros(2, 3, dtype=D)
    loss, _ = grpo_loss(logp, logp, t(100.0, -100.0), clip_range=0.1, adv_clip=5.0)
    assert torch.allclose(loss, torch.zeros((), dtype=D))
    loss1, _ = grpo_loss(logp, logp, t(100.0, 0.0), clip_range=0.1, adv_clip=5.0)
    assert torch.allclose(loss1, t(-2.5).squeeze())


# ----------------------------------------------------------------------------- gradcheck
def test_gradcheck_all_losses():
    g = torch.Generator().manual_seed(7)
    mk = lambda *s: (torch.rand(*s, generator=g, dtype=D) * 0.1).requires_grad_(True)  # noqa: E731
    dw, dl = mk(5), mk(5)
    rw, rl = mk(5).detach(), mk(5).detach()
    w = torch.rand(5, generator=g, dtype=D)
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, rw, b, rl, beta=20.0, weight=w)[0], (dw, dl))
    d = mk(3, 4)
    d_ref = mk(3, 4).detach()
    adv = group_advantages(torch.randn(3, 4, generator=g, dtype=D))
    assert torch.autograd.gradcheck(lambda x: gdpo_loss(x, d_ref, adv, beta=20.0)[0], (d,))
    assert torch.autograd.gradcheck(lambda x: dgpo_loss(x, d_ref, adv, beta=20.0, lambda_t=0.7)[0], (d,))
    lp = mk(6)
    old = lp.detach() + 0.01 * torch.randn(6, generator=g, dtype=D)
    a6 = torch.randn(6, generator=g, dtype=D)
    kl = mk(6)
    assert torch.autograd.gradcheck(lambda x, k: grpo_loss(x, old, a6, clip_range=0.5, kl=k)[0], (lp, kl))


# ----------------------------------------------------------------------------- timesteps
def test_timestep_samplers():
    g = torch.Generator().manual_seed(0)
    ts = uniform_timesteps(1000, g, t_min=0.4, t_max=0.9)
    assert ts.min() >= 0.4 and ts.max() <= 0.9
    st = group_shared_timesteps(3, 4, g)
    assert st.shape == (12,) and all(len(set(st[i * 4:(i + 1) * 4].tolist())) == 1 for i in range(3))
    assert len(set(st.tolist())) == 3
    nz = group_shared_noise(2, 3, (3, 4, 4), g)
    assert torch.equal(nz[0], nz[2]) and not torch.equal(nz[0], nz[3])
    with pytest.raises(ValueError):
        uniform_timesteps(3, g, t_min=0.9, t_max=0.5)


def test_timestep_weight():
    x = t(0.5, 0.25)
    assert torch.equal(timestep_weight(x), torch.ones(2, dtype=D))
    assert torch.allclose(timestep_weight(x, "snr"), t(1.0, 9.0))
    assert torch.allclose(timestep_weight(x, "inverse_t"), t(2.0, 4.0))
