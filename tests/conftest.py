import pytest
import torch

from sralign.policies.tiny import TinyPolicy, TinyPolicyConfig
from sralign.policies.unet import UNetConfig


@pytest.fixture
def tiny_random_policy():
    """A small random-init policy (fast); its output layer is perturbed so it is not zero."""
    torch.manual_seed(0)
    p = TinyPolicy(TinyPolicyConfig(unet=UNetConfig(channels=(8, 16), cond_channels=8, time_dim=32)))
    with torch.no_grad():
        for prm in p.model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    return p


@pytest.fixture
def lr_batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 8, 12, generator=g)


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    p = TinyPolicy(TinyPolicyConfig(unet=UNetConfig(channels=(8, 16), cond_channels=8, time_dim=32)))
    with torch.no_grad():
        for prm in p.model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    d = tmp_path_factory.mktemp("pol") / "tiny"
    p.save(d)
    return d


