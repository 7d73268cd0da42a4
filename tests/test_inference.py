import numpy as np
import pytest
import torch
from PIL import Image

from sralign.data.images import load_image, save_image, save_image_rows, to_uint8
from sralign.inference import StreamedRandn, _ramp, _starts, super_resolve, super_resolve_rows
from sralign.policies.base import Cond, Samples


@pytest.mark.parametrize("numel", [5, 16, 17, 100, 1000, 4099])
def test_streamed_randn_equals_torch_randn(numel):
    ref = torch.randn(numel, generator=torch.Generator().manual_seed(7))
    r = StreamedRandn(numel, 7)
    r.CHUNK = 48  # skip in several calls
    pieces, a = [], 0
    while a < numel:  # overlapping, unaligned reads front to back
        b = min(numel, a + 37)
        got = r.read(max(0, a - 5), b)
        assert torch.equal(got, ref[max(0, a - 5) : b])
        pieces.append(got[min(a, 5) :] if a else got)
        a = b
    assert torch.equal(torch.cat(pieces), ref)
    if numel > 40:
        f = StreamedRandn(numel, 7).fork(numel // 3 + 1)  # starts past the beginning
        assert torch.equal(f.read(numel // 3 + 1, numel), ref[numel // 3 + 1 :])
        with pytest.raises(ValueError, match="front to back"):
            f.read(0, 4)
    g = torch.Generator().manual_seed(7)
    torch.randn(numel, generator=g)
    assert torch.equal(StreamedRandn.generator_after(numel, 7).get_state(), g.get_state())


def _reference_tiled(policy, lr, seed, steps, tile, overlap):
    """The tiling assembled the simple way (whole-image noise and accumulators), for comparison."""
    s = policy.scale
    _, h, w = lr.shape
    noise = torch.randn((1, 3, h * s, w * s), generator=torch.Generator().manual_seed(seed))
    acc, wsum = torch.zeros(3, h * s, w * s), torch.zeros(1, h * s, w * s)
    for y in _starts(h, tile, tile - overlap):
        for x in _starts(w, tile, tile - overlap):
            cond = policy.condition(lr[None, :, y : y + tile, x : x + tile])
            nz = noise[:, :, y * s : (y + tile) * s, x * s : (x + tile) * s]
            img = policy.sample(cond, nz, steps=steps).images[0]
            wt = (_ramp(tile * s, overlap * s, y == 0, y + tile >= h)[:, None] * _ramp(tile * s, overlap * s, x == 0, x + tile >= w)[None])[None]
            acc[:, y * s : (y + tile) * s, x * s : (x + tile) * s] += img * wt
            wsum[:, y * s : (y + tile) * s, x * s : (x + tile) * s] += wt
    return (acc / wsum).clamp(0, 1)


def test_tiled_sr_equals_whole_image_assembly(tiny_random_policy):
    pol = tiny_random_policy
    lr = torch.rand(3, 20, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _reference_tiled(pol, lr, seed=3, steps=2, tile=8, overlap=2)
        whole = pol.sample(pol.condition(lr[None]), torch.randn((1, 3, 80, 112), generator=torch.Generator().manual_seed(3)), steps=2).images[0]
    assert torch.equal(super_resolve(pol, lr, seed=3, steps=2, tile=8, overlap=2), ref)
    assert torch.equal(super_resolve(pol, lr, seed=3, steps=2, tile=0), whole.clamp(0, 1))  # one tile: the noise of old
    bands = list(super_resolve_rows(pol, lr, seed=3, steps=2, tile=8, overlap=2))
    assert len(bands) == 3 and sum(b.shape[1] for b in bands) == 80  # handed out row band by row band


class _Pointwise:
    """A stand-in policy whose output pixel depends only on its own LR pixel and noise value."""

    scale = 2

    def condition(self, lr):
        return Cond(lr, torch.nn.functional.interpolate(lr, scale_factor=2, mode="nearest"))

    def sample(self, cond, noise, **_):
        return Samples((cond.lr_up + 0.05 * noise).clamp(0, 1))


def test_tiling_changes_nothing_but_seams_for_a_pointwise_policy():
    lr = torch.rand(3, 30, 21, generator=torch.Generator().manual_seed(1))
    whole = super_resolve(_Pointwise(), lr, seed=5, tile=0)
    for tile, overlap in ((8, 2), (12, 4)):
        # a pointwise policy has no seams: any tiling blends equal values
        assert torch.allclose(super_resolve(_Pointwise(), lr, seed=5, tile=tile, overlap=overlap), whole, atol=1e-6)
    assert not torch.allclose(super_resolve(_Pointwise(), lr, seed=6, tile=8), whole, atol=1e-3)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_save_image_rows_writes_the_image(tmp_path, ext):
    img = torch.rand(3, 37, 23, generator=torch.Generator().manual_seed(2))
    bands = [img[:, :10], img[:, 10:11], img[:, 11:]]
    save_image_rows(iter(bands), tmp_path / f"a.{ext}", 37, 23)
    save_image(img, tmp_path / f"b.{ext}")
    a = np.asarray(Image.open(tmp_path / f"a.{ext}").convert("RGB"))
    b = np.asarray(Image.open(tmp_path / f"b.{ext}").convert("RGB"))
    assert a.shape == (37, 23, 3) and np.array_equal(a, b)
    if ext == "png":
        assert np.array_equal(a, to_uint8(img))
    with pytest.raises(ValueError, match="expected 37"):
        save_image_rows(iter(bands[:2]), tmp_path / f"c.{ext}", 37, 23)
    assert not (tmp_path / f"c.{ext}").exists() and not list(tmp_path.glob(".tmp-*"))


def test_cli_sr_writes_what_super_resolve_returns(tmp_path, policy_dir):
    from sralign.cli import main
    from sralign.policies import load_policy

    lr = torch.rand(3, 20, 18, generator=torch.Generator().manual_seed(4))
    save_image(lr, tmp_path / "in.png")
    assert main(["sr", str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--policy", str(policy_dir), "--steps", "2",
                 "--tile", "8", "--overlap", "2", "--seed", "1", "--quiet"]) == 0
    ref = super_resolve(load_policy(str(policy_dir)), load_image(tmp_path / "in.png"), seed=1, steps=2, tile=8, overlap=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), to_uint8(ref))
