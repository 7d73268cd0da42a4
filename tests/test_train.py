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
