import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sralign.data.store import CandidateStore
from sralign.policies import load_policy
from sralign.rewards.base import MetricError
from sralign.train.candidates import GenerateConfig, LRSetConfig, generate, score_store
from sralign.train.offline import OfflineTrainer
from sralign.train.offline_config import DP2OConfig
from sralign.train.online import NonFiniteRewardError, OnlineTrainer
from sralign.train.online_config import DGPOConfig, GDPOConfig, GRPOConfig



@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, policy_dir):  # noqa: F811
    d = tmp_path_factory.mktemp("st") / "store"
    st = CandidateStore(d)
    generate(st, load_policy(str(policy_dir)), GenerateConfig(m=8, steps=2, lr_set=LRSetConfig(n=3, patch=32)), progress=False)
    score_store(st, ["psnr", "grad_fidelity", "brisque", "sharpness"], progress=False)
    return d


def _unet(path):
    return {k: v for k, v in load_file(str(path / "policy" / "model.safetensors")).items() if k.startswith("unet.")}


@pytest.mark.parametrize("method", ["dp2o", "dpo"])
def test_offline_training_moves_policy_not_reference(tmp_path, scored_store, policy_dir, method):  # noqa: F811
    p = load_policy(str(policy_dir))
    before = {k: v.clone() for k, v in p.model.state_dict().items()}
    cfg = DP2OConfig(method=method, steps=3, batch_pairs=4, n=2, checkpoint_every=3, lr=1e-3)
    tr = OfflineTrainer(p, CandidateStore(scored_store, repair=False), cfg, tmp_path / "run")
    assert len(tr.pairs) == (3 * 4 if method == "dp2o" else 3)
    tr.train(progress=False)
    after = p.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("unet."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    ref = load_file(str(tmp_path / "run" / "policy" / "reference.safetensors"))
    assert all(torch.equal(ref[k], before[k]) for k in before)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 and "implicit_acc" in rows[0]


def test_offline_kill_and_resume_equals_uninterrupted(tmp_path, scored_store, policy_dir):  # noqa: F811
    common = ["--method", "dp2o", "--store", str(scored_store), "--policy", str(policy_dir), "--quiet",
              "steps=8", "batch_pairs=4", "n=2", "checkpoint_every=2", "lr=1e-3"]
    cli = [sys.executable, "-m", "sralign.cli", "train"]
    subprocess.run([*cli, "--out", str(tmp_path / "full"), *common], check=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cli, "--out", str(killed), *common])
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 120:
        if (killed / "checkpoint" / "state.json").exists():
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([*cli, "--out", str(killed), "--resume", *common], check=True)
    a, b = _unet(tmp_path / "full"), _unet(killed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    la = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lb = (killed / "metrics.jsonl").read_text().splitlines()
    assert len(la) == len(lb) == 8


def _online(cfg_cls, tmp, policy_dir, **kw):  # noqa: F811
    cfg = cfg_cls(steps_total=kw.pop("steps_total", 2), batch_lr=2, group=kw.pop("group", 4), checkpoint_every=1, **kw)
    cfg.lr_set = LRSetConfig(n=3, patch=32)
    return OnlineTrainer(load_policy(str(policy_dir)), cfg, tmp)


@pytest.mark.parametrize("cfg_cls", [GDPOConfig, DGPOConfig, GRPOConfig])
def test_online_methods_run_and_resume_exactly(tmp_path, policy_dir, cfg_cls):  # noqa: F811
    full = _online(cfg_cls, tmp_path / "full", policy_dir, steps_total=3)
    full.train(progress=False)
    part = _online(cfg_cls, tmp_path / "part", policy_dir, steps_total=1)
    part.train(progress=False)
    rest = _online(cfg_cls, tmp_path / "part", policy_dir, steps_total=3)
    rest.train(resume=True, progress=False)
    a, b = full.policy.model.state_dict(), rest.policy.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], full.policy._ref.state_dict()[k]) for k in a if k.startswith("unet."))
    assert rest.reward_evals == full.reward_evals == 3 * 2 * 4


class _ConstReward:
    """A reward that scores every sample equal (zero-variance groups)."""

    names = ["const"]

    def __call__(self, sr, hr):
        from sralign.rewards.base import RewardOut

        return RewardOut(total=torch.full(sr.shape[:2], 0.7))


@pytest.mark.parametrize("cfg_cls", [GDPOConfig, DGPOConfig, GRPOConfig])
def test_zero_variance_groups_leave_weights_unchanged(tmp_path, policy_dir, cfg_cls):  # noqa: F811
    cfg = cfg_cls(steps_total=1, batch_lr=2, group=4, weight_decay=0.0)
    cfg.lr_set = LRSetConfig(n=3, patch=32)
    tr = OnlineTrainer(load_policy(str(policy_dir)), cfg, tmp_path, reward=_ConstReward())
    before = {k: v.clone() for k, v in tr.policy.model.state_dict().items()}
    tr.train(progress=False)
    after = tr.policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    row = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in row and '"zero_std_ratio": 1.0' in row


class _NaNReward:
    def __call__(self, sr, hr):
        raise MetricError("metric brisque returned nan at position [1, 0] (group, member)")


def test_nan_reward_stops_with_lr_id_and_checkpoint(tmp_path, policy_dir):  # noqa: F811
    cfg = DGPOConfig(steps_total=3, batch_lr=2, group=4)
    cfg.lr_set = LRSetConfig(n=3, patch=32)
    tr = OnlineTrainer(load_policy(str(policy_dir)), cfg, tmp_path, reward=_NaNReward())
    with pytest.raises(NonFiniteRewardError, match=r"brisque.*LR ids in this batch: train000\d"):
        tr.train(progress=False)
    assert (tmp_path / "checkpoint" / "state.json").exists()


def _torchrun_train(policy_dir, out, *overrides):
    """``torchrun --nproc_per_node 2 -m sralign.cli train --method dgpo …`` (gloo DDP on the CPU;
    ``accelerate launch --cpu --num_processes 2`` starts a single process on this accelerate)."""
    import os
    import shutil

    exe = shutil.which("torchrun")
    assert exe is not None, "torchrun comes with torch"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = str(29300 + (os.getpid() + len(str(out))) % 400)
    subprocess.run([exe, "--nproc_per_node", "2", "--master_port", port, "-m", "sralign.cli", "train",
                    "--method", "dgpo", "--policy", str(policy_dir), "--out", str(out), "--quiet", *overrides,
                    "batch_lr=1", "group=4", "lr_set.n=6", "lr_set.patch=32"], check=True, env=env, timeout=300)


def test_two_process_ddp_training(tmp_path, policy_dir):  # noqa: F811
    _torchrun_train(policy_dir, tmp_path / "run", "steps_total=2")
    p = load_policy(str(tmp_path / "run" / "policy"))  # plain keys: the unwrapped UNet was saved
    ref = p._ref.state_dict()
    assert any(not torch.equal(v, ref[k]) for k, v in p.model.state_dict().items() if k.startswith("unet."))
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    ck = tmp_path / "run" / "checkpoint"
    assert (ck / "generators.rank0.json").is_file() and (ck / "generators.rank1.json").is_file()  # two ranks ran


def test_two_process_resume_equals_uninterrupted(tmp_path, policy_dir):  # noqa: F811
    """Each rank draws its own batches; a resumed 2-process run restores every rank's generator
    (not rank 0's on both), so 2 steps + resume + 2 steps equals 4 steps."""
    _torchrun_train(policy_dir, tmp_path / "full", "steps_total=4", "checkpoint_every=2")
    _torchrun_train(policy_dir, tmp_path / "cut", "steps_total=2", "checkpoint_every=2")
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 2
    _torchrun_train(policy_dir, tmp_path / "cut", "--resume", "steps_total=4", "checkpoint_every=2")
    a = load_policy(str(tmp_path / "full" / "policy")).model.state_dict()
    b = load_policy(str(tmp_path / "cut" / "policy")).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    ref = load_policy(str(tmp_path / "full" / "policy"))._ref.state_dict()
    assert any(not torch.allclose(a[k], ref[k], atol=1e-5) for k in a)


# ----------------------------------------------------------------------------- presets, micro-batching (issues 14, 15)
import contextlib  # noqa: E402

from sralign.config import load_config  # noqa: E402
from sralign.train.logging_utils import read_metrics  # noqa: E402
from sralign.train.online_config import gdpo_beta  # noqa: E402


def test_authors_presets_set_their_values_and_user_values_win():
    g = load_config(GRPOConfig, None, ["preset=authors"])
    assert (g.minibatches, g.timestep_fraction, g.kl_form, g.steps, g.adv_eps, g.adv_unbiased, g.adv_global_std) == \
        (2, 0.99, "flow_grpo", 10, 1e-4, False, True)
    assert load_config(GRPOConfig, None, ["preset=authors", "minibatches=3"]).minibatches == 3
    d = load_config(DGPOConfig, None, ["preset=authors"])
    assert (d.loss_form, d.beta, d.clip_dsm, d.kl_beta, d.train_timesteps, d.switch_ema_ref) == ("weighted", 100.0, True, 0.02, "discrete", 200)
    assert load_config(DGPOConfig, None, ["preset=authors", "ref_model=ema"]).beta == 2000.0  # their EMA-reference config
    assert load_config(DGPOConfig, None, ["preset=authors", "beta=7"]).beta == 7.0
    gd = load_config(GDPOConfig, None, ["preset=authors"])
    assert (gd.beta, gd.dsm_target, gd.texture_rule, gd.adv_unbiased, gd.adv_eps) == (5000.0, "eps", "authors", True, 1e-8)
    # sralign's defaults are untouched by the presets' existence
    assert (GRPOConfig().minibatches, DGPOConfig().loss_form, DGPOConfig().beta, GDPOConfig().beta) == (1, "exact", 5000.0, None)
    from sralign.config import ConfigError

    with pytest.raises(ConfigError, match="preset"):
        load_config(DGPOConfig, None, ["preset=paper"])
    with pytest.raises(ConfigError, match="trunc_steps"):
        load_config(DGPOConfig, None, ["preset=authors", "steps=4"])


def test_gdpo_beta_depends_on_the_backend():
    class _SD:
        kind = "onestep_sd"

    assert gdpo_beta(GDPOConfig(), _SD()) == 5000.0  # the authors' β on SD latents' ε-MSE
    assert gdpo_beta(GDPOConfig(), object()) == 100.0  # the tiny policy's x̂0 DSM
    assert gdpo_beta(GDPOConfig(beta=30.0), _SD()) == 30.0


def _grads(tr):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in tr.policy.trainable_parameters()])


def _one_batch(tr):
    c = tr.cfg
    idx = torch.randint(len(tr.ids), (c.batch_lr,), generator=tr.gen).tolist()
    cond = tr.policy.condition(tr.lr[idx])
    samples = tr.rollout(cond, len(idx))
    adv = tr.advantages(tr.score(samples.images, idx).total)
    return cond, samples, adv


@pytest.mark.parametrize("cfg_cls,preset,mb", [
    (GDPOConfig, "sralign", 5), (GDPOConfig, "authors", 4), (DGPOConfig, "sralign", 3), (DGPOConfig, "authors", 5),
    (GRPOConfig, "sralign", 3), (GRPOConfig, "authors", 3),
])
def test_micro_batched_gradients_equal_one_shot(tmp_path, policy_dir, cfg_cls, preset, mb):  # noqa: F811
    kw = dict(steps_total=1, batch_lr=2, group=4, lr_set=LRSetConfig(n=3, patch=32))
    if cfg_cls is not GDPOConfig:
        kw["steps"] = 3
    if cfg_cls is DGPOConfig and preset == "authors":
        kw.update(trunc_steps=2, n_train_timesteps=2, dsm_clip_range=1e-4)
    cfg = cfg_cls.with_preset(preset, **kw)
    tr = OnlineTrainer(load_policy(str(policy_dir)), cfg, tmp_path)
    # in float64, so that what is compared is the arithmetic, not float32 rounding of sums
    tr.policy.model.double()
    tr.policy._ref.double()
    tr.ema.state = {k: v.double() for k, v in tr.ema.state.items()}
    with torch.no_grad():  # an EMA that differs from the policy, so the DSM clip selects some samples
        for k in tr.ema.state:
            tr.ema.state[k].add_(1e-3 * torch.randn(tr.ema.state[k].shape, generator=torch.Generator().manual_seed(1)))
    cond, samples, adv = _one_batch(tr)
    rows = torch.randperm(8, generator=torch.Generator().manual_seed(2))[:5] if cfg_cls is GRPOConfig and preset == "authors" else None
    state = tr.gen.get_state()
    tr.opt.zero_grad(set_to_none=True)
    loss1, st1 = tr.loss(cond, samples, adv, rows)
    g1 = _grads(tr).clone()
    tr.gen.set_state(state)
    tr.cfg.micro_batch = mb
    assert len(tr._chunks(8, rows)) > 1
    tr.opt.zero_grad(set_to_none=True)
    loss2, st2 = tr.loss(cond, samples, adv, rows)
    g2 = _grads(tr)
    assert g1.norm() > 0
    assert float((g1 - g2).norm() / g1.norm()) <= 1e-6
    assert abs(float(loss1) - float(loss2)) <= 1e-5 * max(1.0, abs(float(loss1)))
    if cfg_cls is DGPOConfig and preset == "authors":
        assert st1["clip_frac"] == st2["clip_frac"] and 0 < st1["clip_frac"] < 1


def test_grpo_authors_preset_clips_after_the_first_inner_update(tmp_path):
    # the shipped policy (a random one barely moves its log-probs in one small update)
    cfg = GRPOConfig.with_preset("authors", steps_total=1, batch_lr=2, group=4, lr_set=LRSetConfig(n=3, patch=32))
    tr = OnlineTrainer(load_policy(), cfg, tmp_path)
    calls = []
    step = tr.policy.sde_step
    tr.policy.sde_step = lambda *a, **k: (calls.append(a[3]), step(*a, **k))[1]
    tr.train(progress=False)
    (row,) = read_metrics(tmp_path)
    # two updates per rollout batch: the first sees ratio 1 (clip_frac 0), the second has moved
    assert row["clip_frac"] > 0 and row["approx_kl"] > 0
    # rollout: 10 SDE steps; training: int(0.99·10) = 9 transitions, policy + reference, 2 updates
    assert sorted(set(calls)) == list(range(10)) and calls.count(9) == 1 and calls.count(0) == 1 + 2 * 2


def test_grpo_single_update_never_clips(tmp_path, policy_dir):  # noqa: F811
    cfg = GRPOConfig(steps_total=1, batch_lr=2, group=4, lr_set=LRSetConfig(n=3, patch=32))
    OnlineTrainer(load_policy(str(policy_dir)), cfg, tmp_path).train(progress=False)
    (row,) = read_metrics(tmp_path)
    assert row["clip_frac"] == 0 and row["approx_kl"] == 0


def test_switch_ema_ref_rolls_out_from_the_policy_first(tmp_path, policy_dir):  # noqa: F811
    cfg = DGPOConfig(steps_total=1, batch_lr=2, group=4, switch_ema_ref=2, lr_set=LRSetConfig(n=3, patch=32))
    tr = OnlineTrainer(load_policy(str(policy_dir)), cfg, tmp_path)
    for s, from_policy in ((0, True), (2, True), (3, False)):
        tr.step = s
        assert isinstance(tr._rollout_ctx(), contextlib.nullcontext) is from_policy
