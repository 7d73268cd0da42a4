"""sralign.train.pretrain: the data and starting point of the tiny policy's pretraining."""

from __future__ import annotations

import torch
import pytest
from PIL import Image

from sralign.config import ConfigError
from sralign.data.images import ImageError
from sralign.data.degradation import RealESRGANConfig, RealESRGANDegradation, SimpleDegradationConfig, simple_degradation
from sralign.policies.tiny import TinyPolicy, shipped_checkpoint_dir
from sralign.train.pretrain import PretrainConfig, degrade_mixed, ema_decay_at, pretrain


def _hr(b=4, size=32):
    g = torch.Generator().manual_seed(3)
    return torch.rand(b, 3, size, size, generator=g)


def test_degrade_mixed_splits_the_batch_between_the_two_recipes():
    hr = _hr()
    cfg = PretrainConfig(degradation_mix=0.5)
    lr = degrade_mixed(hr, cfg, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    real = RealESRGANDegradation(RealESRGANConfig(scale=4))(hr[:2], g)
    simple = simple_degradation(hr[2:], 4, g, SimpleDegradationConfig())
    want = (torch.cat([real, simple]) * 255).round() / 255
    assert lr.shape == (4, 3, 8, 8)
    assert torch.equal(lr, want)
    assert torch.equal(lr * 255, (lr * 255).round())  # 8-bit, like a saved LR
    # mix 0: the simple recipe alone (what the shipped checkpoint's first 3000 steps used)
    lr0 = degrade_mixed(hr, PretrainConfig(degradation_mix=0.0), torch.Generator().manual_seed(0))
    assert torch.equal(lr0, (simple_degradation(hr, 4, torch.Generator().manual_seed(0), SimpleDegradationConfig()) * 255).round() / 255)


def _photos(folder, sizes):
    folder.mkdir()
    g = torch.Generator().manual_seed(1)
    for k, (h, w) in enumerate(sizes):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"p{k}.png")
    return folder


def test_pretrain_fine_tunes_from_init_on_extra_photographs(tmp_path):
    photos = _photos(tmp_path / "hr", [(160, 200), (140, 150)])
    val = _photos(tmp_path / "val", [(130, 130)])
    cfg = PretrainConfig(steps=1, batch_size=2, patch=32, hr_dir=str(photos), val_dir=str(val), degradation_mix=0.5,
                         init=str(shipped_checkpoint_dir()), lr=1e-12, lr_min=0.0, warmup=0, ema_decay=0.5, eval_every=1)
    cfg.policy.ode_start = 0.5
    out = pretrain(cfg, tmp_path / "run", progress=False)
    shipped = TinyPolicy.from_pretrained(None)
    for (k, a), (_, b) in zip(out.model.state_dict().items(), shipped.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k  # lr ~0: the EMA is still the checkpoint it started from
    import json
    rec = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    for key in ("psnr_ode", "ssim_onestep", "psnr_bicubic_realesrgan", "ssim_ode_realesrgan"):
        assert key in rec and rec[key] == rec[key]  # measured, not NaN


def test_ema_decay_warms_up_like_diffusers_ema_model():
    """min(decay, (1 + k) / (10 + k)) at update k (diffusers' EMAModel default), by hand."""
    cfg = PretrainConfig(ema_decay=0.999)
    assert ema_decay_at(0, cfg) == pytest.approx(0.1)
    assert ema_decay_at(8, cfg) == pytest.approx(0.5)
    assert ema_decay_at(890, cfg) == pytest.approx(0.99)
    assert ema_decay_at(100_000, cfg) == 0.999  # capped at ema_decay
    assert ema_decay_at(0, PretrainConfig(ema_decay=0.999, ema_warmup=False)) == 0.999


def test_the_ema_of_a_fine_tuning_run_forgets_its_init(tmp_path):
    """One step from the shipped checkpoint: the saved model is 0.1·init + 0.9·θ₁ with the
    warm-up (decay 0.1 at update 0) and 0.999·init + 0.001·θ₁ without; θ₁ = the raw weights the
    run's checkpoint holds."""
    from safetensors.torch import load_file

    photos = _photos(tmp_path / "hr", [(130, 130)])
    init = TinyPolicy.from_pretrained(None).model.state_dict()
    for warm, keep in ((True, 0.1), (False, 0.999)):
        cfg = PretrainConfig(steps=1, batch_size=2, patch=32, hr_dir=str(photos), val_dir=str(photos), init=str(shipped_checkpoint_dir()),
                             lr=1e-2, lr_min=1e-2, warmup=0, ema_decay=0.999, ema_warmup=warm)
        run = tmp_path / f"run{warm}"
        out = pretrain(cfg, run, progress=False).model.state_dict()
        raw = {k[len("model."):]: v for k, v in load_file(run / "checkpoint" / "state.safetensors").items() if k.startswith("model.")}
        moved = 0
        for k, v in out.items():
            assert torch.allclose(v, keep * init[k] + (1 - keep) * raw[k], atol=1e-6), k
            moved += int(not torch.equal(raw[k], init[k]))
        assert moved > 10  # the step changed the weights, so the two cases differ


def test_pretrain_refuses_bad_folders_before_work(tmp_path):
    with pytest.raises(ConfigError, match="init .* holds no config.json"):
        pretrain(PretrainConfig(init=str(tmp_path)), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="hr_dir .* is not a folder"):
        pretrain(PretrainConfig(hr_dir=str(tmp_path / "nope")), tmp_path / "a", progress=False)
    small = _photos(tmp_path / "small", [(40, 40)])
    with pytest.raises(ImageError, match="no readable image of at least 64x64 px"):
        pretrain(PretrainConfig(hr_dir=str(small), patch=64), tmp_path / "b", progress=False)
    with pytest.raises(ImageError, match="val_dir .* no readable image of at least 128x128 px"):
        pretrain(PretrainConfig(val_dir=str(small)), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before the run folder


def test_the_shipped_recipes_load_and_the_later_stages_ask_for_their_init(tmp_path):
    """README rebuilds the checkpoint stage by stage with ``--config RECIPE init=PREVIOUS``: every
    recorded recipe (stages 1, 2 and 3, the last as ``pretrain_config.yaml``) must parse and validate,
    and the later stages without ``init`` must say so."""
    from sralign.config import load_config, validate

    assets = shipped_checkpoint_dir()
    stage1 = validate(load_config(PretrainConfig, assets / "pretrain_stage1.yaml"))
    assert stage1.steps == 3000 and stage1.init == ""
    photos = tmp_path / "p"
    photos.mkdir()
    folders = [f"hr_dir={photos}", f"val_dir={photos}"]
    for path, mix in ((assets / "pretrain_stage2.yaml", 0.5), (assets / "pretrain_config.yaml", 0.0)):
        later = validate(load_config(PretrainConfig, path, [f"init={assets}", *folders]))
        assert later.init == str(assets) and later.patch == 128 and later.degradation_mix == mix
        with pytest.raises(ConfigError, match="init"):
            validate(load_config(PretrainConfig, path, folders))
