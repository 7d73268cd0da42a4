"""FluxControlNet on tiny random-config diffusers models built in the test (no downloads)."""

import pytest
import torch

from diffusers_helpers import assert_lora_roundtrip, assert_only_lora_changed, snapshot, train_one_step, write_tiny_flux
from sralign.policies.diffusers.flux_controlnet import FluxControlNet, pack, unpack

@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux") / "tiny-flux"
    write_tiny_flux(d)
    return d


def test_pack_roundtrip():
    z = torch.randn(2, 4, 6, 8)
    assert torch.equal(unpack(pack(z), 6, 8), z)


def test_samplers_reference_and_lora(flux_folder, tmp_path):
    pol = FluxControlNet.from_pretrained(flux_folder)
    cond = pol.condition(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    n1 = torch.randn(pol.noise_shape(cond, 2), generator=torch.Generator().manual_seed(1))
    n2 = torch.randn(pol.noise_shape(cond, 2), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = pol.sample(cond, n1, steps=3).images
        b = pol.sample(cond, n2, steps=3).images
        s = pol.sample(cond, n1, sampler="sde", steps=3, generator=torch.Generator().manual_seed(0))
        c2 = cond.repeat(2)
        for i in range(3):
            _, lp, _, _ = pol.sde_step(c2, s.trajectory[:, i], s.sigmas, i, prev_sample=s.trajectory[:, i + 1])
            assert torch.allclose(lp, s.log_probs[:, i], atol=1e-4)
        for p in pol.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
        moved = pol.sample(cond, n1, steps=3).images
        with pol.reference():
            ref = pol.sample(cond, n1, steps=3).images
    assert a.shape == (2, 3, 32, 32) and s.log_probs.shape == (2, 3)
    assert (a - b).abs().mean() > 1e-4
    assert torch.equal(ref, a) and not torch.allclose(moved, a)
    x0 = torch.rand(2, 3, 32, 32)
    d = pol.dsm(x0, cond, torch.tensor([0.3, 0.7]), torch.randn(pol.dsm_noise_shape(x0)))
    d.sum().backward()
    for nme, p in pol.model.named_parameters():
        assert (p.grad is not None) == ("lora" in nme and nme.startswith("unet.")), nme
    assert_lora_roundtrip(pol, FluxControlNet, tmp_path / "a")


@pytest.mark.parametrize("method", ["dgpo", "grpo", "dp2o", "dpo"])
def test_one_step_of_each_method_changes_only_lora(flux_folder, tmp_path, method):
    pol = FluxControlNet.from_pretrained(flux_folder)
    before = snapshot(pol)
    train_one_step(pol, method, tmp_path)
    assert_only_lora_changed(pol, before)


def test_cli_train_with_model_path(flux_folder, tmp_path):
    from sralign.cli import main

    out = tmp_path / "run"
    assert main(["train", "--method", "dgpo", "--policy", "flux", "--model-path", str(flux_folder), "--out", str(out), "--quiet",
                 "steps_total=1", "batch_lr=1", "group=2", "steps=2", "rollout_from=policy", "lr_set.n=2", "lr_set.patch=32"]) == 0
    from sralign.policies import load_policy

    assert isinstance(load_policy(str(out / "policy")), FluxControlNet)


def test_two_process_ddp_with_lora_and_reference(flux_folder, tmp_path):
    """torchrun, 2 ranks: the LoRA backbone is DDP-wrapped, and reference() / EMA rollouts still
    reach the adapters through the wrapper; both ranks end with the same adapters."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29700 + os.getpid() % 200), "-m", "sralign.cli",
                    "train", "--method", "dgpo", "--policy", "flux", "--model-path", str(flux_folder), "--out", str(out), "--quiet",
                    "steps_total=2", "batch_lr=1", "group=2", "steps=2", "rollout_from=ema", "lr_set.n=4", "lr_set.patch=32", "lr=1e-2"],
                   check=True, env=env, timeout=300)
    from sralign.policies import load_policy

    pol = load_policy(str(out / "policy"))
    assert isinstance(pol, FluxControlNet)
    assert any(v.abs().max() > 0 for k, v in pol._lora_state().items() if "lora_B" in k)  # trained (B starts at 0)
    ck = out / "checkpoint"
    assert (ck / "generators.rank0.json").is_file() and (ck / "generators.rank1.json").is_file()


def test_c_flux_preset_posterior_and_schedule(flux_folder, tmp_path):
    """--preset c-flux: the paper's settings; the ControlNet latent is a posterior draw (seeded by
    the generator); FLUX.1-dev's shifted grid is used without a scheduler folder."""
    from sralign.policies.diffusers.presets import load_policy_with_settings

    pol = load_policy_with_settings(None, str(flux_folder), preset="c-flux", dtype="fp32")
    c = pol.config
    assert (c.guidance_scale, c.control_latent, c.resize, c.dtype) == (2.5, "sample", "pil-bicubic", "fp32")
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = pol.condition(lr, generator=torch.Generator().manual_seed(1)).features["control"]
    b = pol.condition(lr, generator=torch.Generator().manual_seed(1)).features["control"]
    d = pol.condition(lr, generator=torch.Generator().manual_seed(2)).features["control"]
    mode = FluxControlNet.from_pretrained(flux_folder).condition(lr).features["control"]
    assert torch.equal(a, b) and not torch.equal(a, d) and not torch.allclose(a, mode)
    sig = pol.sigmas(4, 1024)
    assert float(sig[0]) == 1.0 and float(sig[-1]) == 0.0 and float(sig[1]) > 0.75 + 1e-3  # shifted towards noise


def test_eval_with_preset_and_settings(flux_folder, tmp_path):
    """eval --preset: the run's aligned policy sampled with the preset's sampler and the settings."""
    import json

    from sralign.cli import main

    run = tmp_path / "run"
    FluxControlNet.from_pretrained(flux_folder).save(run / "policy")
    assert main(["eval", str(run), "--preset", "c-flux", "--dtype", "fp32", "--quiet", "m=2", "steps=2", "lr_set.n=1",
                 "lr_set.patch=32", "policy.controlnet_scale=0.5", "grid_images=1", "grid_seeds=1"]) == 0
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert res["samplers"]["run"] == "ode" and res["m"] == 2
    assert main(["eval", str(run), "--out", str(tmp_path / "e2"), "--quiet", "m=2", "policy.no_such_key=1"]) == 2
    assert not (tmp_path / "e2").exists()
