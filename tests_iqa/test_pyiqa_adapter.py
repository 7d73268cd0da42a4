"""The pyiqa adapter against real pyiqa (run in CI's [iqa] stage: see README and .ci/run).

Only metrics that need no weight files run here (psnr, ssim, piqe); a weighted metric is used
to check that a missing file fails with a clear message instead of a download.
"""

import pytest
import torch

from sralign.rewards.functional import psnr_y
from sralign.rewards.pyiqa_adapter import MissingWeightsError
from sralign.rewards.registry import get_metric


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(3, 3, 64, 64, generator=g)
    sr = (hr + 0.05 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    return sr, hr


def test_psnr_matches_builtin_and_direction(images):
    sr, hr = images
    m = get_metric("pyiqa:psnr", test_y_channel=True, color_space="ycbcr")
    assert m.kind == "FR" and m.higher_is_better
    v = m(sr, hr)
    assert v.shape == (3,)
    assert torch.allclose(v, psnr_y(sr, hr), atol=0.05)


def test_ssim_fr_batched(images):
    sr, hr = images
    m = get_metric("pyiqa:ssim")
    a = m(sr, hr)
    b = torch.cat([m(sr[i : i + 1], hr[i : i + 1]) for i in range(3)])
    assert a.shape == (3,) and torch.allclose(a, b, atol=1e-5)
    assert (m(hr, hr) > a).all()


def test_piqe_is_nr_lower_better(images):
    sr, hr = images
    m = get_metric("pyiqa:piqe")
    assert m.kind == "NR" and not m.higher_is_better
    assert m(sr).shape == (3,)


def test_missing_weights_name_metric_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MissingWeightsError) as e:
        get_metric("pyiqa:brisque", weights_dir=tmp_path / "weights")
    msg = str(e.value)
    print(msg)
    assert "'brisque'" in msg and ".pth" in msg and str(tmp_path / "weights") in msg
    assert not any((tmp_path / "weights").glob("*.pth"))


def test_unknown_pyiqa_metric():
    from sralign.rewards.base import MetricError

    with pytest.raises(MetricError, match="pyiqa has no metric"):
        get_metric("pyiqa:not_a_metric")
