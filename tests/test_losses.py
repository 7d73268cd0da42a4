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


# ----------------------------------------------------------------------------- the authors' conventions (issue 15)
from sralign.losses import (  # noqa: E402
    dgpo_grad_weights, discrete_shared_timesteps, dsm_clip_mask, gdpo_grad_weights, transition_kl,
)
from sralign.policies.flow import flow_sde_step  # noqa: E402


def test_advantages_flow_grpo_dgpo_convention_hand_computed():
    # Flow-GRPO / DGPO: subtract the group mean, divide by the population std (no Bessel) plus
    # 1e-4, clamp to ±5. Group [1,2,3,4]: mean 2.5, population std √1.25.
    r = t(1.0, 2.0, 3.0, 4.0)[None]
    a = group_advantages(r, eps=1e-4, unbiased=False, clip=5.0)
    s = math.sqrt(1.25) + 1e-4
    assert torch.allclose(a, t(-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s)[None], atol=1e-12)
    # a near-tied group: 1e-6 apart. Bessel + 1e-8 makes it ±5e-7/(1e-6/√2 + 1e-8) ≈ ±0.70;
    # theirs is ±5e-7/(5e-7 + 1e-4) ≈ ±0.005
    tied = t(0.5, 0.5 + 1e-6)[None]
    ours = group_advantages(tied)
    theirs = group_advantages(tied, eps=1e-4, unbiased=False, clip=5.0)
    assert abs(float(ours[0, 1]) - 5e-7 / (1e-6 / math.sqrt(2) + 1e-8)) < 1e-6
    assert abs(float(theirs[0, 1]) - 5e-7 / (5e-7 + 1e-4)) < 1e-9  # ≈ 0.005
    # the clamp: one 1 among 29 zeros is (29/30)/(std + 1e-4) = 5.38 standard deviations out -> 5
    lone = torch.zeros(1, 30, dtype=D)
    lone[0, -1] = 1.0
    a = group_advantages(lone, eps=1e-4, unbiased=False, clip=5.0)
    std = math.sqrt((1 / 30) * (29 / 30))
    assert (29 / 30) / (std + 1e-4) > 5 and float(a[0, -1]) == 5.0
    assert abs(float(a[0, 0]) - (-1 / 30) / (std + 1e-4)) < 1e-12


def test_advantages_global_std_hand_computed():
    # global_std: the mean is still per group, the std is taken over every reward of the batch
    r = torch.stack([t(0.0, 1.0), t(10.0, 14.0)])
    a = group_advantages(r, eps=1e-4, unbiased=False, global_std=True)
    allr = [0.0, 1.0, 10.0, 14.0]
    m = sum(allr) / 4
    s = math.sqrt(sum((x - m) ** 2 for x in allr) / 4) + 1e-4
    assert torch.allclose(a, torch.stack([t(-0.5 / s, 0.5 / s), t(-2 / s, 2 / s)]), atol=1e-12)
    # per group the two groups would get ±1 each (population std 0.5 and 2)
    per = group_advantages(r, eps=0.0, unbiased=False)
    assert torch.allclose(per, torch.stack([t(-1.0, 1.0), t(-1.0, 1.0)]))
    # the pool can come from elsewhere (every rank's rewards)
    pooled = group_advantages(r[:1], eps=1e-4, unbiased=False, global_std=True, all_rewards=r)
    assert torch.allclose(pooled, a[:1])


def test_dgpo_authors_weighted_gradient_hand_computed():
    # DGPO's code: w_i = sigmoid(Σ_g A_ig·β·(d_ig − d_ref_ig) / G) with the d's detached, loss =
    # mean over all n·G samples of w_i·A_ig·d_ig, so ∂loss/∂d_ig = w_i·A_ig / (n·G).
    d = t(0.30, 0.25, 0.40, 0.20, 0.50, 0.35).view(2, 3).requires_grad_(True)
    d_ref = t(0.31, 0.24, 0.40, 0.22, 0.49, 0.35).view(2, 3)
    adv = t(1.0, -0.5, -0.5, -1.2, 0.2, 1.0).view(2, 3)
    beta, G, n = 100.0, 3, 2
    loss, _ = dgpo_loss(d, d_ref, adv, beta, form="weighted")
    loss.backward()
    want = torch.zeros(2, 3, dtype=D)
    for i in range(n):
        s = sum(float(adv[i, g]) * beta * (float(d.detach()[i, g]) - float(d_ref[i, g])) / G for g in range(G))
        w = 1 / (1 + math.exp(-s))
        for g in range(G):
            want[i, g] = w * float(adv[i, g]) / (n * G)
    assert torch.allclose(d.grad, want, atol=1e-14)
    # sralign's exact form has the same direction, β·λ_t times larger
    d2 = d.detach().clone().requires_grad_(True)
    dgpo_loss(d2, d_ref, adv, beta, lambda_t=0.5, form="exact")[0].backward()
    d3 = d.detach().clone().requires_grad_(True)
    dgpo_loss(d3, d_ref, adv, beta, lambda_t=0.5, form="weighted")[0].backward()
    assert torch.allclose(d2.grad, 0.5 * beta * d3.grad, atol=1e-12)


def test_dsm_clip_hand_computed():
    # DGPO's clip_dsm: ratio = exp(d_old − d); a sample with A > 0 is clipped when ratio > 1 + ε,
    # one with A ≤ 0 when ratio < 1 − ε; clipped samples enter with d detached (no gradient).
    eps = 1e-2
    d_old = t(0.50, 0.50, 0.50, 0.50)[None]
    d = t(0.48, 0.499, 0.52, 0.501)[None]  # ratios e^.02, e^.001, e^-.02, e^-.001
    adv = t(1.0, 1.0, -1.0, -1.0)[None]
    assert dsm_clip_mask(d, d_old, adv, eps).tolist() == [[True, False, True, False]]
    # the same samples with flipped advantages move against their direction: never clipped
    assert not dsm_clip_mask(d, d_old, -adv, eps).any()
    dd = d.clone().requires_grad_(True)
    loss, st = dgpo_loss(dd, d_old, adv, 100.0, form="weighted", d_old=d_old, clip_range=eps)
    loss.backward()
    assert dd.grad[0, 0] == 0 and dd.grad[0, 2] == 0 and dd.grad[0, 1] != 0 and dd.grad[0, 3] != 0
    assert float(st["clip_frac"]) == 0.5


@pytest.mark.parametrize("form", ["exact", "weighted"])
def test_group_grad_weights_equal_autograd(form):
    # the micro-batching weights: ∇ Σ c·d equals ∇ loss, with and without the DSM clip and KL-free
    g = torch.Generator().manual_seed(0)
    d0 = torch.rand(3, 4, generator=g, dtype=D)
    d_ref = d0 + 0.01 * torch.randn(3, 4, generator=g, dtype=D)
    d_old = d0 + 0.02 * torch.randn(3, 4, generator=g, dtype=D)
    adv = group_advantages(torch.rand(3, 4, generator=g, dtype=D))
    for clip in (None, 1e-2):
        d = d0.clone().requires_grad_(True)
        dgpo_loss(d, d_ref, adv, 100.0, lambda_t=0.7, form=form, d_old=d_old, clip_range=clip)[0].backward()
        c, loss, _ = dgpo_grad_weights(d0, d_ref, adv, 100.0, lambda_t=0.7, form=form, d_old=d_old, clip_range=clip)
        assert torch.allclose(c, d.grad, atol=1e-14)
        assert torch.allclose(loss, dgpo_loss(d0, d_ref, adv, 100.0, lambda_t=0.7, form=form, d_old=d_old, clip_range=clip)[0])
    d = d0.clone().requires_grad_(True)
    gdpo_loss(d, d_ref, adv, 50.0)[0].backward()
    c, _, _ = gdpo_grad_weights(d0, d_ref, adv, 50.0)
    assert torch.allclose(c, d.grad, atol=1e-14)


def test_dgpo_kl_term_adds_beta_kl_times_mean():
    d, d_ref, adv = t(0.3, 0.2)[None], t(0.3, 0.2)[None], t(1.0, -1.0)[None]
    kl = t(0.5, 1.5)
    base, _ = dgpo_loss(d, d_ref, adv, 100.0, form="weighted")
    with_kl, st = dgpo_loss(d, d_ref, adv, 100.0, form="weighted", kl=kl, kl_beta=0.02)
    assert torch.allclose(with_kl - base, t(0.02 * 1.0)) and float(st["kl"]) == 1.0


def test_flow_grpo_kl_forms_hand_computed():
    # transition: the KL of N(μ_θ, s²) and N(μ_ref, s²) per dimension, s = σ_t·√|dt|;
    # Flow-GRPO divides the squared mean gap by 2σ_t² instead (σ_t the std before √|dt|)
    mean = torch.zeros(1, 1, 2, 2, dtype=D)
    mean_ref = torch.full((1, 1, 2, 2), 0.1, dtype=D)
    sigma_t, dt = 0.7 * math.sqrt(0.9 / 0.1), -0.1
    std = torch.tensor(sigma_t * math.sqrt(0.1), dtype=D)
    ours = transition_kl(mean, mean_ref, std, dt)
    theirs = transition_kl(mean, mean_ref, std, dt, form="flow_grpo")
    assert abs(float(ours) - 0.01 / (2 * sigma_t**2 * 0.1)) < 1e-12
    assert abs(float(theirs) - 0.01 / (2 * sigma_t**2)) < 1e-12
    assert abs(float(theirs) / float(ours) - 0.1) < 1e-12  # |dt| times weaker
    with pytest.raises(ValueError, match="kl form"):
        transition_kl(mean, mean_ref, std, dt, form="x")


def test_flow_grpo_first_sde_step_hand_computed():
    # Flow-GRPO at σ = 1: σ_t = √(σ/(1 − σ₁))·η — the numerator keeps σ = 1, only 1 − σ is
    # replaced by 1 − σ₁ (σ₁ the next level) — and mean = x·(1 + σ_t²·dt/2) + v·dt (the (1 − σ)
    # term vanishes), std = σ_t·√(−dt)
    sig = t(1.0, 0.8, 0.4, 0.0)
    x = torch.full((1, 1, 1, 2), 0.3, dtype=D)
    v = torch.full((1, 1, 1, 2), -0.2, dtype=D)
    eta = 0.7
    prev = torch.full((1, 1, 1, 2), 0.5, dtype=D)
    _, lp, mean, std = flow_sde_step(x, v, sig, 0, eta, prev_sample=prev)
    st = math.sqrt(1.0 / (1 - 0.8)) * eta
    m = 0.3 * (1 + st**2 * (-0.2) / 2) + (-0.2) * (-0.2)
    s = st * math.sqrt(0.2)
    assert abs(float(std) - s) < 1e-12 and torch.allclose(mean, torch.full_like(mean, m), atol=1e-12)
    want = -((0.5 - m) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)
    assert abs(float(lp) - want) < 1e-10
    # a later step (σ < 1) uses σ itself: σ_t = √(0.8/0.2)·η
    _, _, _, std1 = flow_sde_step(x, v, sig, 1, eta, prev_sample=prev)
    assert abs(float(std1) - math.sqrt(0.8 / 0.2) * eta * math.sqrt(0.4)) < 1e-12


def test_one_step_sde_is_finite_and_zero_noise_refused():
    sig = t(1.0, 0.0)  # σ₁ = 0: σ_t = √(1/1)·η = η, std = η
    x = torch.randn(2, 3, 4, 4, dtype=D)
    v = torch.randn(2, 3, 4, 4, dtype=D)
    xn, lp, _, std = flow_sde_step(x, v, sig, 0, 0.7, generator=torch.Generator().manual_seed(0))
    assert abs(float(std) - 0.7) < 1e-12 and torch.isfinite(lp).all() and torch.isfinite(xn).all()
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_step(x, v, sig, 0, 0.0)


def test_discrete_shared_timesteps_from_the_noisiest_levels():
    sig = torch.linspace(1.0, 0.0, 11)  # a 10-step schedule
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ts = discrete_shared_timesteps(sig, 6, 4, g)
        assert ts.numel() == 4 and len(set(ts.tolist())) == 4
        assert all(any(abs(v - float(s)) < 1e-7 for s in sig[:7]) for v in ts.tolist())  # indices 0..6 only
    with pytest.raises(ValueError, match="trunc_steps"):
        discrete_shared_timesteps(sig, 10, 2)
    with pytest.raises(ValueError, match="n_train_timesteps"):
        discrete_shared_timesteps(sig, 2, 4)
