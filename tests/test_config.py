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


def test_ranged_fields_and_types_are_checked():
    from dataclasses import dataclass

    from sralign.config import ranged

    @dataclass
    class C:
        beta: float = ranged(1.0, gt=0)
        steps: int = ranged(3, ge=1)
        mode: str = ranged("a", choices=("a", "b"))
        names: list[str] = ranged(default_factory=lambda: ["x"], nonempty=True)
        lo: float = 0.0
        hi: float = 1.0

        def cross_check(self):
            return f"lo ({self.lo}) must not exceed hi ({self.hi})" if self.lo > self.hi else None

    assert load_config(C, None, ["beta=2", "steps=4", "mode=b", "names=[y, z]"]).names == ["y", "z"]
    for ov, msg in [("beta=0", r"beta must be in \(0, inf\), got 0"), ("beta=-1", "beta must be in"),
                    ("steps=0", r"steps must be in \[1, inf\), got 0"), ("steps=1.5", "steps must be an integer, got 1.5"),
                    ("mode=c", "mode must be one of a | b, got 'c'"), ("names=[]", "names must be non-empty"),
                    ("names=x", "names must be a list"), ("lo=2", r"lo \(2.0\) must not exceed hi")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(C, None, [ov])
