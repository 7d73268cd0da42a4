import pytest

from sralign.config import ConfigError, load_config
from sralign.train.offline_config import DP2OConfig
from sralign.train.online_config import DGPOConfig


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("beta: 2000\nlr: 1e-5\nfr_metrics: [psnr]\n")
    cfg = load_config(DP2OConfig, f, ["steps=7", "n=2"])
    assert cfg.beta == 2000.0 and cfg.lr == 1e-5 and cfg.steps == 7 and cfg.n == 2 and cfg.fr_metrics == ["psnr"]


def test_nested_override_and_unknown_key():
    cfg = load_config(DGPOConfig, None, ["lr_set.n=5", "t_min=0.2"])
    assert cfg.lr_set.n == 5 and cfg.t_min == 0.2
    with pytest.raises(ConfigError, match="unknown config key.*betta.*valid keys"):
        load_config(DGPOConfig, None, ["betta=1"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(DGPOConfig, None, ["beta"])
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(DGPOConfig, None, ["beta=big"])
