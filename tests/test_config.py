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


# ---------------------------------------------------------------------------- issue 17: value ranges
import dataclasses  # noqa: E402

from sralign.config import validate  # noqa: E402
from sralign.data.degradation import RealESRGANConfig, SimpleDegradationConfig  # noqa: E402
from sralign.eval.run import EvalConfig  # noqa: E402
from sralign.policies.tiny import TinyPolicyConfig  # noqa: E402
from sralign.train.candidates import GenerateConfig, LRSetConfig  # noqa: E402
from sralign.train.online_config import GDPOConfig, GRPOConfig  # noqa: E402
from sralign.train.pretrain import PretrainConfig  # noqa: E402

ALL_CONFIGS = [DP2OConfig, GDPOConfig, DGPOConfig, GRPOConfig, GenerateConfig, LRSetConfig, PretrainConfig, EvalConfig,
               RealESRGANConfig, SimpleDegradationConfig, TinyPolicyConfig]


@pytest.mark.parametrize("cls", ALL_CONFIGS)
def test_every_default_config_is_valid(cls):
    validate(cls())
    assert load_config(cls) == cls()  # loading changes no default


# (config, overrides, what the one-line message must say): every case of issue 17
RANGE_CASES = [
    (DP2OConfig, ["beta=-1"], r"config key beta must be in \(0, inf\), got -1.0"),
    (DP2OConfig, ["beta=0"], r"config key beta must be in \(0, inf\), got 0.0"),
    (GDPOConfig, ["beta=0"], r"config key beta must be in \(0, inf\), got 0.0"),
    (DP2OConfig, ["lr=0"], r"config key lr must be in \(0, inf\), got 0.0"),
    (DGPOConfig, ["lr=0"], r"config key lr must be in \(0, inf\), got 0.0"),
    (DP2OConfig, ["t_min=0.8", "t_max=0.2"], r"t_min \(0.8\) must not exceed t_max \(0.2\)"),
    (DGPOConfig, ["t_min=0.8", "t_max=0.5"], r"t_min \(0.8\) must not exceed t_max \(0.5\)"),
    (DGPOConfig, ["t_max=5"], r"config key t_max must be in \(0, 1\], got 5.0"),
    (DP2OConfig, ["t_max=5"], r"config key t_max must be in \(0, 1\], got 5.0"),
    (DGPOConfig, ["ema_max=5"], r"config key ema_max must be in \[0, 1\], got 5.0"),
    (DP2OConfig, ["steps=0"], r"config key steps must be in \[1, inf\), got 0"),
    (GRPOConfig, ["steps_total=0"], r"config key steps_total must be in \[1, inf\), got 0"),
    (DGPOConfig, ["steps=0"], r"config key steps must be in \[1, 1000\], got 0"),
    (GenerateConfig, ["m=0"], r"config key m must be in \[2, inf\), got 0"),
    (GenerateConfig, ["steps=0"], r"config key steps must be in \[1, 1000\], got 0"),
    (GDPOConfig, ["group=1"], r"config key group must be in \[2, inf\), got 1"),  # GDPOConfig re-declares group
    (DGPOConfig, ["group=1"], r"config key group must be in \[2, inf\), got 1"),
    (DP2OConfig, ["batch_pairs=0"], r"config key batch_pairs must be in \[1, inf\), got 0"),
    (DP2OConfig, ["grad_accum=0"], r"config key grad_accum must be in \[1, inf\), got 0"),
    (DP2OConfig, ["checkpoint_every=0"], r"config key checkpoint_every must be in \[1, inf\), got 0"),
    (DGPOConfig, ["checkpoint_every=0"], r"config key checkpoint_every must be in \[1, inf\), got 0"),
    (DP2OConfig, ["steps=1.5"], r"config key steps must be an integer, got 1.5"),
    (DP2OConfig, ["n=0"], r"config key n must be in \[1, inf\), got 0"),
    (DP2OConfig, ["fr_metrics=[]", "nr_metrics=[]"], "fr_metrics and nr_metrics are both empty"),
    (DGPOConfig, ["fr_metrics=[]", "nr_metrics=[]"], "fr_metrics and nr_metrics are both empty"),
    (GDPOConfig, ["nr_metrics=[]"], "nr_metrics is empty; the attribute reward"),
    (DP2OConfig, ["fr_metrics=psnr"], r"config key fr_metrics must be a list \(e.g. fr_metrics=\[a,b\]\), got 'psnr'"),
    (DGPOConfig, ["nr_metrics=brisque"], "config key nr_metrics must be a list"),
    (DP2OConfig, ["fr_metrics=[psnrr]"], r"fr_metrics names unknown metric 'psnrr'; valid: brisque, .*psnr.* or pyiqa:NAME"),
    (DP2OConfig, ["nr_metrics=[psnr]"], "nr_metrics lists 'psnr', a full-reference metric; it belongs in the FR list"),
    (DP2OConfig, ["method=ppo"], "config key method must be one of dp2o | dpo, got 'ppo'"),
    (GRPOConfig, ["method=dgpo"], "method 'dgpo' does not fit GRPOConfig"),
    (DGPOConfig, ["sampler=euler"], "config key sampler must be one of ode | sde | onestep | ddpm, got 'euler'"),
    (DGPOConfig, ["lr_set.n=0"], r"config key lr_set.n must be in \[1, inf\), got 0"),
    (DGPOConfig, ["lr_set.patch=30"], r"patch \(30\) must be a multiple of scale \(4\)"),
    (DGPOConfig, ["lr_set.split=val"], "split 'val' names no bundled set"),
    (DGPOConfig, ["lr_set.hr_dir=/nonexistent/hr"], "hr_dir '/nonexistent/hr' is not a folder"),
    (DP2OConfig, ["mixed_precision=fp8"], "config key mixed_precision must be one of no | bf16 | fp16"),
    (PretrainConfig, ["batch_size=0"], r"config key batch_size must be in \[1, inf\)"),
    (PretrainConfig, ["policy.scale=0"], r"config key policy.scale must be in \[1, inf\)"),
    (PretrainConfig, ["ema_decay=1"], r"config key ema_decay must be in \[0, 1\), got 1.0"),
    (EvalConfig, ["m=0"], r"config key m must be in \[1, inf\), got 0"),
    (EvalConfig, ["heldout_metrics=[nope]"], "heldout_metrics names unknown metric 'nope'"),
    (RealESRGANConfig, ["scale=0"], r"config key scale must be in \[1, inf\), got 0"),
    (RealESRGANConfig, ["sinc_prob=1.5"], r"sinc_prob must be a probability in \[0, 1\], got 1.5"),
    (RealESRGANConfig, ["noise_range=[30, 1]"], r"noise_range \[30, 1\] is not a \(low, high\) range"),
]


@pytest.mark.parametrize("cls,ov,msg", RANGE_CASES, ids=[" ".join(c[1]) + f" ({c[0].__name__})" for c in RANGE_CASES])
def test_config_value_ranges_fail_with_key_range_and_value(cls, ov, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(cls, None, ov)
    assert "\n" not in str(e.value)


def test_string_for_a_list_is_never_read_letter_by_letter(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("fr_metrics: psnr\n")
    with pytest.raises(ConfigError, match="fr_metrics must be a list"):
        load_config(DP2OConfig, f)
    with pytest.raises(ConfigError, match="fr_metrics must be a list"):
        validate(DP2OConfig(fr_metrics="psnr"))  # built in code


def test_relations_and_boundaries_that_stay_valid():
    assert load_config(DGPOConfig, None, ["t_min=0.5", "t_max=0.5"]).t_min == 0.5  # t_min = t_max: a fixed t
    assert load_config(DP2OConfig, None, ["fr_metrics=[]"]).nr_metrics == ["gap:brisque", "gap:niqe_s"]  # NR-only reward
    assert load_config(DP2OConfig, None, ["nr_metrics=[pyiqa:musiq]"]).nr_metrics == ["pyiqa:musiq"]  # checked when loaded
    assert load_config(DGPOConfig, None, ["lr_set.hr_dir=.", "lr_set.split=mine"]).lr_set.split == "mine"
    assert load_config(GenerateConfig, None, ["m=2"]).m == 2


def test_subclass_default_keeps_the_base_range():
    f = {x.name: x for x in dataclasses.fields(GDPOConfig)}["group"]
    assert "check" not in f.metadata  # GDPOConfig re-declares group = 6 without a range ...
    with pytest.raises(ConfigError, match="group must be in"):
        validate(GDPOConfig(group=1))  # ... and still gets OnlineConfig's


@pytest.mark.parametrize("text,msg", [
    ("- beta\n- lr\n", "must hold a mapping of keys to values .*got a list"),
    ("beta: [1, 2\n", "is not valid YAML: .* at line 2"),
    ("beta: 1\n  lr: 2\n", "is not valid YAML"),
    ("'just a string'\n", "got a str"),
])
def test_bad_yaml_files_are_one_line_errors(tmp_path, text, msg):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=msg) as e:
        load_config(DP2OConfig, f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_unreadable_config_files_and_overrides(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00beta")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(DP2OConfig, tmp_path / "bin.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(DP2OConfig, tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(DP2OConfig, tmp_path / "empty.yaml") == DP2OConfig()
    with pytest.raises(ConfigError, match="value is not valid YAML"):
        load_config(DP2OConfig, None, ["fr_metrics=[psnr"])
    with pytest.raises(ConfigError, match="lr_set is not a section"):
        load_config(DGPOConfig, None, ["lr_set=3", "lr_set.n=2"])


def test_degradation_kernel_names_are_checked():
    with pytest.raises(ConfigError, match=r"kernel_list names unknown kernel\(s\) \['box'\]; valid: iso"):
        load_config(RealESRGANConfig, None, ["kernel_list=[iso, box]", "kernel_prob=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match="one weight per entry"):
        load_config(RealESRGANConfig, None, ["kernel_list=[iso]"])
