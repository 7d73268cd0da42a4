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
from sralign.rewards.hybrid import DEFAULT_FR, DEFAULT_NR
from sralign.train.candidates import GenerateConfig, LRSetConfig, build_pairs, generate, score_store
from sralign.train.offline import OfflineTrainer
from sralign.train.offline_config import DP2OConfig
from sralign.train.online import NonFiniteRewardError, OnlineTrainer
from sralign.train.online_config import DGPOConfig, GDPOConfig, GRPOConfig



@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, policy_dir):  # noqa: F811
    d = tmp_path_factory.mktemp("st") / "store"
    st = CandidateStore(d, create=True)
    generate(st, load_policy(str(policy_dir)), GenerateConfig(m=8, steps=2, lr_set=LRSetConfig(n=3, patch=32)), progress=False)
    score_store(st, [*DEFAULT_FR, *DEFAULT_NR], progress=False)  # the default reward's metrics
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


def test_offline_pairs_follow_the_nr_weight(tmp_path, scored_store, policy_dir):  # noqa: F811
    """``nr_weight`` is the hybrid's NR share: the trainer's reward takes it, and an FR-only and an
    NR-only ranking of the same candidates give different best-vs-worst pairs."""
    store = CandidateStore(scored_store, repair=False)
    pairs = {}
    for w in (0.0, 0.25, 1.0):
        tr = OfflineTrainer(load_policy(str(policy_dir)), store, DP2OConfig(method="dpo", nr_weight=w), tmp_path / f"r{w}")
        assert (tr.reward.fr_weight, tr.reward.nr_weight) == (1.0 - w, w)
        pairs[w] = [(pr.cid_w, pr.cid_l) for pr in tr.pairs]
    assert pairs[0.0] != pairs[1.0]


def test_offline_pairs_with_the_attribute_reward_hand_computed(tmp_path, scored_store, policy_dir):  # noqa: F811
    """``reward=attribute``: each LR's HR gives its textured share f; a candidate's reward is
    (1 − f)·minmax(PSNR-Y) + f·mean(minmax(NR)) within the LR's group (GDPO-SR's formula, written
    out here); Diffusion-DPO pairs its best with its worst."""
    import shutil

    from sralign.config import ConfigError, load_config, validate
    from sralign.rewards.attribute import AttributeReward, texture_map

    d = tmp_path / "store"
    shutil.copytree(scored_store, d)
    st = CandidateStore(d, repair=False)
    score_store(st, ["psnr"], progress=False)
    tr = OfflineTrainer(load_policy(str(policy_dir)), st, DP2OConfig(method="dpo", reward="attribute"), tmp_path / "run")
    assert isinstance(tr.reward, AttributeReward) and tr.reward.names == ["psnr", *DEFAULT_NR]
    key = st.resolve_key(None)
    names = tr.reward.names
    expected = {}
    for lr_id, rows in st.grouped(key, names):
        v = torch.tensor([r[2 : 2 + len(names)] for r in rows], dtype=torch.float64)  # [G, metrics], all higher-better
        norm = (v - v.min(0).values) / (v.max(0).values - v.min(0).values)
        f = float(texture_map(st.load_lr(lr_id, key=key)[1][None].float()).mean())
        total = (1 - f) * norm[:, 0] + f * norm[:, 1:].mean(1)
        expected[lr_id] = (rows[int(total.argmax())][0], rows[int(total.argmin())][0])
    assert {p.lr_id: (p.cid_w, p.cid_l) for p in tr.pairs} == expected and len(expected) == 3
    hybrid = OfflineTrainer(load_policy(str(policy_dir)), st, DP2OConfig(method="dpo"), tmp_path / "h")
    assert {p.lr_id: (p.cid_w, p.cid_l) for p in hybrid.pairs} != expected  # the ranking is not the hybrid's
    with pytest.raises(ConfigError, match="nr_metrics lists 'gmsd', a full-reference metric"):
        validate(load_config(DP2OConfig, None, ["reward=attribute", "nr_metrics=[gmsd]"]))


def _grads(policy):
    return torch.cat([q.grad.flatten() for q in policy.trainable_parameters() if q.grad is not None])


@pytest.mark.parametrize("method", ["dp2o", "dpo"])
def test_offline_micro_batches_give_the_one_shot_gradient(tmp_path, scored_store, policy_dir, method):  # noqa: F811
    """The batch's loss is the weighted mean over all its pairs (HPO weights for dp2o): micro-
    batches of 1, 3 and 5 pairs (uneven last one) accumulate the same gradient as one pass."""
    store = CandidateStore(scored_store, repair=False)
    got = {}
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN convolutions round differently per batch size
        for m in (0, 1, 3, 5):
            p = load_policy(str(policy_dir))
            tr = OfflineTrainer(p, store, DP2OConfig(method=method, n=2, micro_batch=m, seed=3), tmp_path / f"r{m}")
            batch = [tr.pairs[i] for i in torch.randint(len(tr.pairs), (7,), generator=torch.Generator().manual_seed(1)).tolist()]
            if method == "dp2o":
                assert len({round(b.weight, 6) for b in batch}) > 1  # the weights differ: normalisation matters
            stats = tr.accumulate(batch, scale=0.5)
            got[m] = (_grads(p), stats)
    ref, ref_stats = got[0]
    assert ref.abs().sum() > 0
    for m in (1, 3, 5):
        g, st = got[m]
        assert (g - ref).norm() <= 1e-6 * ref.norm(), m
        assert all(abs(st[k] - ref_stats[k]) <= 1e-6 * max(1.0, abs(ref_stats[k])) for k in ref_stats), (m, st, ref_stats)


def test_generate_lr_batch_gives_the_same_candidates(tmp_path, policy_dir):  # noqa: F811
    pol = load_policy(str(policy_dir))
    rows, imgs = {}, {}
    for b in (1, 3):
        st = CandidateStore(tmp_path / f"s{b}", create=True)
        generate(st, pol, GenerateConfig(m=4, steps=2, chunk=3, lr_batch=b, lr_set=LRSetConfig(n=4, patch=32)), progress=False)
        rows[b] = st.rows()
        imgs[b] = torch.stack([st.read_image(c.path) for c in st.candidates()])
    assert len(rows[1]) == 16 and [r[:3] for r in rows[1]] == [r[:3] for r in rows[3]]  # (LR id, seed, key)
    # batched convolutions may round differently in the last bit: at most one 8-bit level
    assert (imgs[1] - imgs[3]).abs().max() <= 1 / 255 + 1e-6
    assert (imgs[1] != imgs[3]).float().mean() < 0.01


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
    import sys

    exe = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, whether or not the venv's bin is on PATH
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = str(29300 + (os.getpid() + len(str(out))) % 400)
    subprocess.run([*exe, "--nproc_per_node", "2", "--master_port", port, "-m", "sralign.cli", "train",
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


def _trainer_grads(tr):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in tr.policy.trainable_parameters()])


def _one_batch(tr):
    c = tr.cfg
    idx = torch.randint(len(tr.ids), (c.batch_lr,), generator=tr.gen).tolist()
    _, lr, hr, _ = tr.data.batch(idx)
    cond = tr.policy.condition(lr.to(tr.accel.device))
    samples = tr.rollout(cond, len(idx))
    adv = tr.advantages(tr.score(samples.images, idx, hr.to(tr.accel.device)).total)
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
    g1 = _trainer_grads(tr).clone()
    tr.gen.set_state(state)
    tr.cfg.micro_batch = mb
    assert len(tr._chunks(8, rows)) > 1
    tr.opt.zero_grad(set_to_none=True)
    loss2, st2 = tr.loss(cond, samples, adv, rows)
    g2 = _trainer_grads(tr)
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


# ---------------------------------------------------------------------------- issue 17: checked before work, resume checks
from sralign.cli import main  # noqa: E402
from sralign.config import ConfigError  # noqa: E402
from sralign.train.checkpoint import CheckpointError, check_resume  # noqa: E402

_DGPO = ["--quiet", "batch_lr=1", "group=3", "lr_set.n=2", "lr_set.patch=32", "checkpoint_every=1"]


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def dgpo_run(tmp_path, policy_dir):  # noqa: F811
    run = tmp_path / "run"
    assert main(["train", "--method", "dgpo", "--policy", str(policy_dir), "--out", str(run), "steps_total=1", *_DGPO]) == 0
    return run


def _err_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [l for l in err.splitlines() if "error:" in l]
    return line


def test_resume_as_another_method_is_refused_naming_both(dgpo_run, scored_store, policy_dir, capsys):  # noqa: F811
    before = _files(dgpo_run)
    rc = main(["train", "--method", "dp2o", "--store", str(scored_store), "--policy", str(policy_dir), "--out", str(dgpo_run),
               "--resume", "--quiet", "steps=2", "n=2"])
    line = _err_line(capsys)
    assert rc == 2 and "is a dgpo run, not dp2o" in line and "--method dgpo" in line
    rc = main(["train", "--method", "grpo", "--policy", str(policy_dir), "--out", str(dgpo_run), "--resume", "steps_total=2", *_DGPO])
    assert rc == 2 and "is a dgpo run, not grpo" in _err_line(capsys)
    assert _files(dgpo_run) == before


def test_resume_with_another_config_is_refused_but_more_steps_are_fine(dgpo_run, policy_dir, capsys):  # noqa: F811
    before = _files(dgpo_run)
    rc = main(["train", "--method", "dgpo", "--policy", str(policy_dir), "--out", str(dgpo_run), "--resume", "steps_total=2", "beta=10",
               *_DGPO])
    line = _err_line(capsys)
    assert rc == 2 and "beta: run has 5000.0, now 10.0" in line and "config.yaml" in line
    assert _files(dgpo_run) == before
    assert main(["train", "--method", "dgpo", "--policy", str(policy_dir), "--out", str(dgpo_run), "--resume", "steps_total=2", *_DGPO]) == 0
    assert json.loads((dgpo_run / "checkpoint" / "state.json").read_text())["step"] == 2


def test_check_resume_in_code_and_without_a_checkpoint(tmp_path, dgpo_run):
    check_resume(tmp_path / "fresh", DGPOConfig())  # nothing to resume: nothing to check
    with pytest.raises(CheckpointError, match=r"lr_set.n: run has 2, now 32"):
        check_resume(dgpo_run, DGPOConfig(batch_lr=1, group=3, checkpoint_every=1, lr_set=LRSetConfig(n=32, patch=32)))
    check_resume(dgpo_run, DGPOConfig(batch_lr=1, group=3, checkpoint_every=7, steps_total=9, lr_set=LRSetConfig(n=2, patch=32)))


@pytest.mark.parametrize("damage,needle", [
    (lambda ck: (ck / "state.json").write_text('{"step": 1, "rng'), "state.json is corrupt"),
    (lambda ck: (ck / "state.json").write_text("[]"), "state.json is corrupt"),
    (lambda ck: (ck / "state.safetensors").write_bytes(b"\x00" * 64), "state.safetensors is missing or corrupt"),
    (lambda ck: (ck / "state.safetensors").unlink(), "state.safetensors is missing or corrupt"),
])
def test_corrupt_checkpoint_is_a_one_line_error(dgpo_run, policy_dir, damage, needle):  # noqa: F811
    damage(dgpo_run / "checkpoint")
    before = _files(dgpo_run)
    r = subprocess.run([sys.executable, "-m", "sralign.cli", "train", "--method", "dgpo", "--policy", str(policy_dir), "--out",
                        str(dgpo_run), "--resume", "steps_total=2", *_DGPO], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = [l for l in r.stderr.splitlines() if "error:" in l]
    assert needle in line and "delete" in line
    assert _files(dgpo_run) == before


def test_checkpoint_of_another_model_is_a_one_line_error(dgpo_run, tmp_path, capsys):
    from sralign.policies.tiny import TinyPolicy, TinyPolicyConfig
    from sralign.policies.unet import UNetConfig

    other = tmp_path / "other"
    TinyPolicy(TinyPolicyConfig(unet=UNetConfig(channels=(8, 8), cond_channels=8, time_dim=32))).save(other)
    rc = main(["train", "--method", "dgpo", "--policy", str(other), "--out", str(dgpo_run), "--resume", "steps_total=2", *_DGPO])
    line = _err_line(capsys)
    assert rc == 2 and "checkpoint does not fit this model" in line


def test_damaged_last_metrics_line_does_not_stop_a_resume(dgpo_run, policy_dir):  # noqa: F811
    m = dgpo_run / "metrics.jsonl"
    m.write_text(m.read_text() + '{"step": 1, "loss": 0.')  # a kill -9 in the middle of a write
    assert main(["train", "--method", "dgpo", "--policy", str(policy_dir), "--out", str(dgpo_run), "--resume", "steps_total=2", *_DGPO]) == 0
    assert [json.loads(l)["step"] for l in m.read_text().splitlines()] == [0, 1]


def test_configs_built_in_code_are_checked_where_work_starts(tmp_path, policy_dir, scored_store):  # noqa: F811
    from sralign.eval.run import EvalConfig, run_eval
    from sralign.train.pretrain import PretrainConfig, pretrain

    pol = load_policy(str(policy_dir))
    with pytest.raises(ConfigError, match=r"beta must be in \(0, inf\), got -1"):
        OnlineTrainer(pol, DGPOConfig(beta=-1, lr_set=LRSetConfig(n=2, patch=32)), tmp_path / "a")
    with pytest.raises(ConfigError, match="group must be in"):
        OnlineTrainer(pol, GDPOConfig(group=1), tmp_path / "a")
    with pytest.raises(ConfigError, match="batch_pairs must be in"):
        OfflineTrainer(pol, CandidateStore(scored_store, repair=False), DP2OConfig(batch_pairs=0), tmp_path / "b")
    with pytest.raises(ConfigError, match="fr_metrics must be a list"):
        OfflineTrainer(pol, CandidateStore(scored_store, repair=False), DP2OConfig(fr_metrics="psnr"), tmp_path / "b")
    st = CandidateStore(tmp_path / "s", create=True)
    with pytest.raises(ConfigError, match=r"m must be in \[2, inf\), got 0"):
        generate(st, pol, GenerateConfig(m=0, lr_set=LRSetConfig(n=2, patch=32)), progress=False)
    assert st.lr_ids() == []  # nothing was written
    with pytest.raises(ConfigError, match="steps must be in"):
        pretrain(PretrainConfig(steps=0), tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="m must be in"):
        run_eval({"x": policy_dir}, EvalConfig(m=0), tmp_path / "d", progress=False)
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_n_larger_than_half_of_m_fails_before_the_run_folder(tmp_path, scored_store, policy_dir, capsys):  # noqa: F811
    run = tmp_path / "run"
    rc = main(["train", "--method", "dp2o", "--store", str(scored_store), "--policy", str(policy_dir), "--out", str(run), "--quiet", "n=5"])
    line = _err_line(capsys)
    assert rc == 2 and "2N <= M" in line and "N=5, M=8" in line
    assert not run.exists()


def test_resume_of_a_run_saved_before_a_field_existed(dgpo_run):
    import yaml

    f = dgpo_run / "config.yaml"
    d = yaml.safe_load(f.read_text())
    del d["adv_eps"]  # as if the run predates the field: it ran with the default
    f.write_text(yaml.safe_dump(d, sort_keys=False))
    cfg = DGPOConfig(batch_lr=1, group=3, checkpoint_every=1, lr_set=LRSetConfig(n=2, patch=32))
    check_resume(dgpo_run, cfg)
    cfg.adv_eps = 1e-3
    with pytest.raises(CheckpointError, match=r"adv_eps: run has 1e-08, now 0.001"):
        check_resume(dgpo_run, cfg)


# ---------------------------------------------------------------------------- issue 14: overlapped rollouts, autocast
import logging  # noqa: E402
import threading  # noqa: E402


def _overlap_run(out, policy_dir, cfg_cls=GDPOConfig, steps_total=3, callback=None, resume=False, **kw):  # noqa: F811
    cfg = cfg_cls(steps_total=steps_total, batch_lr=2, group=3, checkpoint_every=1, lr_set=LRSetConfig(n=3, patch=32), **kw)
    tr = OnlineTrainer(load_policy(str(policy_dir)), cfg, out)
    threads = []
    prepare = tr._prepare
    tr._prepare = lambda: (threads.append(threading.current_thread().name), prepare())[1]
    tr.train(progress=False, resume=resume, callback=callback)
    return tr, threads


def test_overlapped_rollouts_give_the_sequential_result(tmp_path, policy_dir, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="sralign.train.online"):
        on, t_on = _overlap_run(tmp_path / "on", policy_dir, overlap_rollouts=True)
    off, t_off = _overlap_run(tmp_path / "off", policy_dir, overlap_rollouts=False)
    assert on.overlap and not off.overlap
    assert sum("rollouts: overlapped" in r.getMessage() for r in caplog.records) == 1
    # steps 2 and 3 were rolled out in the background thread; sequentially all in the main thread
    assert t_on[0] == threading.main_thread().name and all(n.startswith("sralign-rollout") for n in t_on[1:]) and len(t_on) == 3
    assert t_off == [threading.main_thread().name] * 3
    a, b = on.policy.model.state_dict(), off.policy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], on.policy._ref.state_dict()[k]) for k in a if k.startswith("unet."))
    ra, rb = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    assert [(r["reward_mean"], r["loss"]) for r in ra] == [(r["reward_mean"], r["loss"]) for r in rb] and len(ra) == 3
    assert torch.equal(on.gen.get_state(), off.gen.get_state())


def test_overlapped_run_stopped_after_a_prefetch_resumes_to_the_same_result(tmp_path, policy_dir):  # noqa: F811
    full, _ = _overlap_run(tmp_path / "full", policy_dir, steps_total=4)
    # stop after step 2: step 3's rollouts were already drawn in the background, then dropped
    part, threads = _overlap_run(tmp_path / "part", policy_dir, steps_total=4, callback=lambda tr: tr.step == 2)
    assert part.step == 2 and len(threads) == 3
    rest, _ = _overlap_run(tmp_path / "part", policy_dir, steps_total=4, resume=True)
    a, b = full.policy.model.state_dict(), rest.policy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward_mean"] for r in read_metrics(tmp_path / "full")] == [r["reward_mean"] for r in read_metrics(tmp_path / "part")]


@pytest.mark.parametrize("cfg_cls,kw", [(DGPOConfig, {}), (GRPOConfig, {"steps": 2}), (GDPOConfig, {"rollout_from": "policy"})])
def test_rollouts_from_a_moving_model_stay_sequential(tmp_path, policy_dir, cfg_cls, kw, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="sralign.train.online"):
        tr, threads = _overlap_run(tmp_path, policy_dir, cfg_cls, steps_total=2, overlap_rollouts=True, **kw)
    assert not tr.overlap and tr.rollout_path.startswith("sequential")
    assert threads == [threading.main_thread().name] * 2
    assert any(f"rollouts: sequential: rollouts come from the {tr.cfg.rollout_from}" in r.getMessage() for r in caplog.records)


def test_lora_backend_overlaps_the_scoring_only_with_the_same_result(tmp_path):
    """OneStepSD (LoRA: reference() disables adapters module-wide) has no reference view: the
    update waits for the background rollout, and the parameters match the sequential run's."""
    from diffusers_helpers import METRICS, tiny_sd_unet, tiny_vae
    from sralign.policies.diffusers import OneStepSD

    torch.manual_seed(0)
    d = tmp_path / "tiny-sd"
    tiny_vae().save_pretrained(d / "vae")
    tiny_sd_unet().save_pretrained(d / "unet")
    params = {}
    for overlap in (True, False):
        cfg = GDPOConfig(steps_total=3, batch_lr=1, group=3, reward="hybrid", overlap_rollouts=overlap,
                         lr_set=LRSetConfig(n=2, patch=32), **METRICS)
        torch.manual_seed(1)  # the LoRA adapters' initialisation
        tr = OnlineTrainer(OneStepSD.from_pretrained(d), cfg, tmp_path / f"run{overlap}")
        init = [p.detach().clone() for p in tr.policy.trainable_parameters()]
        assert tr.overlap is overlap and (not overlap or "the update waits" in tr.rollout_path)
        tr.train(progress=False)
        params[overlap] = [p.detach().clone() for p in tr.policy.trainable_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params[True], params[False])) and len(params[True]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(params[True], init))


def test_dgpo_from_the_reference_overlaps_with_the_same_result(tmp_path, policy_dir):  # noqa: F811
    kw = dict(rollout_from="reference", steps=3, train_timesteps="discrete", trunc_steps=2, n_train_timesteps=2)
    on, t_on = _overlap_run(tmp_path / "on", policy_dir, DGPOConfig, **kw)
    off, _ = _overlap_run(tmp_path / "off", policy_dir, DGPOConfig, overlap_rollouts=False, **kw)
    assert on.overlap and t_on[-1].startswith("sralign-rollout")
    a, b = on.policy.model.state_dict(), off.policy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _conv_dtypes(*modules):
    """Forward hooks on the first conv of each of ``modules``: record (grad enabled, output dtype)."""
    seen = []
    for module in modules:
        conv = next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.dtype)))
    return seen


def _all_float32_with_grads(params):
    params = list(params)
    return all(p.dtype == torch.float32 for p in params) and all(p.grad is not None and p.grad.dtype == torch.float32 for p in params) \
        and any(float(p.grad.abs().sum()) > 0 for p in params)


@pytest.mark.parametrize("cfg_cls", [GDPOConfig, DGPOConfig, GRPOConfig])
def test_online_bf16_autocasts_forwards_and_keeps_float32_parameters(tmp_path, policy_dir, cfg_cls):  # noqa: F811
    cfg = cfg_cls(steps_total=1, batch_lr=2, group=3, steps=2 if cfg_cls is not GDPOConfig else 1, mixed_precision="bf16",
                  lr_set=LRSetConfig(n=3, patch=32))
    tr = OnlineTrainer(load_policy(str(policy_dir)), cfg, tmp_path)
    seen = _conv_dtypes(tr.policy.model.unet, tr.policy._ref.unet)  # rollouts and DSM terms of π_ref too
    b = tr._prepare()
    assert (False, torch.bfloat16) in seen and b.samples.images.dtype == torch.float32  # rollout under autocast
    seen.clear()
    adv = tr.advantages(tr.score(b.samples.images, b.idx, b.hr).total)
    tr.opt.zero_grad(set_to_none=True)
    loss, _ = tr.loss(b.cond, b.samples, adv)
    assert (True, torch.bfloat16) in seen and (True, torch.float32) not in seen  # the training forward
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert _all_float32_with_grads(tr.policy.trainable_parameters())


def test_offline_bf16_autocasts_forwards_and_keeps_float32_parameters(tmp_path, scored_store, policy_dir):  # noqa: F811
    p = load_policy(str(policy_dir))
    cfg = DP2OConfig(steps=1, batch_pairs=4, n=2, mixed_precision="bf16")
    tr = OfflineTrainer(p, CandidateStore(scored_store, repair=False), cfg, tmp_path / "run")
    seen = _conv_dtypes(p.model.unet)
    tr.opt.zero_grad(set_to_none=True)
    stats = tr.accumulate(tr.pairs[:4])
    assert (True, torch.bfloat16) in seen and (True, torch.float32) not in seen
    assert all(isinstance(v, float) for v in stats.values()) and abs(stats["loss"]) < float("inf")
    assert _all_float32_with_grads(p.trainable_parameters())


def test_offline_checks_pair_files_from_the_pair_query_without_lookups(tmp_path, scored_store, policy_dir, monkeypatch):  # noqa: F811
    import shutil

    from sralign.data.store import BlobError

    d = tmp_path / "store"
    shutil.copytree(scored_store, d)
    st = CandidateStore(d, repair=False)
    calls = []
    monkeypatch.setattr(CandidateStore, "candidate", lambda self, cid: calls.append(cid))
    cfg = DP2OConfig(steps=1, batch_pairs=2, n=2)
    tr = OfflineTrainer(load_policy(str(policy_dir)), st, cfg, tmp_path / "run")
    assert calls == []  # one query for pairs and files; no lookup per candidate
    monkeypatch.undo()
    paired = {c for p in tr.pairs for c in (p.cid_w, p.cid_l)}
    files = {}
    build_pairs(st, tr.reward, 2, "dp2o", files=files)
    assert set(files) == paired and all(files[c] == st.candidate(c) for c in paired)
    assert len(paired) < len(st.candidates())  # the middle candidates (M = 8, N = 2) are not paired
    # a paired file gone: the same one-line error as before, before any step; an unpaired one is no matter
    unpaired = next(c for c in st.candidates() if c.cid not in paired)
    (d / unpaired.path).unlink()
    OfflineTrainer(load_policy(str(policy_dir)), CandidateStore(d, repair=False), cfg, tmp_path / "run2")
    gone = files[max(paired)]
    (d / gone.path).unlink()
    with pytest.raises(BlobError) as e:
        OfflineTrainer(load_policy(str(policy_dir)), CandidateStore(d, repair=False), cfg, tmp_path / "run3")
    msg = str(e.value)
    assert "\n" not in msg and str(d / gone.path) in msg and f"candidate {gone.cid}: LR {gone.lr_id}, seed {gone.seed}" in msg
    assert "is missing; `sralign generate` with the same settings regenerates it" in msg
    assert not (tmp_path / "run3").exists()
