import io

import numpy as np
import pytest
import torch
from PIL import Image

from sralign.data.degradation import (
    RealESRGANConfig, RealESRGANDegradation, add_gaussian_noise, filter2d, gaussian_kernel2d,
    jpeg_roundtrip, random_blur_kernel, sinc_kernel2d, simple_degradation,
)
from sralign.data.images import ImageError, ImageFolder, PairedPatches, bundled_images, center_crop, load_bundled, load_image, save_image


def _hf_energy(x):
    lap = torch.tensor([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=x.dtype)[None, None].repeat(3, 1, 1, 1)
    return torch.nn.functional.conv2d(x, lap, groups=3).pow(2).mean()


@pytest.fixture(scope="module")
def photo():
    img = load_bundled("heldout")[0][1]
    return center_crop(img, 128)[None]


def test_bundled_split_is_fixed_and_disjoint():
    tr = [b.name for b in bundled_images("train")]
    ho = [b.name for b in bundled_images("heldout")]
    assert len(tr) >= 8 and len(ho) >= 3 and not set(tr) & set(ho)
    assert ho == [b.name for b in bundled_images("heldout")]


def test_blur_lowers_high_frequency_energy(photo):
    k = torch.from_numpy(gaussian_kernel2d(21, 2.0, 2.0, 0.0)).float()[None]
    assert _hf_energy(filter2d(photo, k)) < 0.3 * _hf_energy(photo)
    ks = torch.from_numpy(sinc_kernel2d(21, np.pi / 4)).float()[None]
    assert _hf_energy(filter2d(photo, ks)) < _hf_energy(photo)


def test_kernels_normalised_and_sampled_types():
    g = torch.Generator().manual_seed(0)
    cfg = RealESRGANConfig()
    for _ in range(30):
        k = random_blur_kernel(g, cfg)
        assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-6
    aniso = gaussian_kernel2d(21, 3.0, 0.5, 0.0)
    assert aniso[10, :].std() > aniso[:, 10].std()  # wide along x


def test_gaussian_noise_sigma_within_tolerance():
    g = torch.Generator().manual_seed(0)
    x = torch.full((2, 3, 64, 64), 0.5)
    y = add_gaussian_noise(x, torch.tensor([10 / 255, 20 / 255]), torch.tensor([False, True]), g)
    est = (y - x).flatten(1).std(1) * 255
    assert abs(est[0] - 10) < 0.5 and abs(est[1] - 20) < 1.0
    n = y[1] - x[1]
    assert torch.allclose(n[0], n[1])  # gray noise: same in every channel
    assert _hf_energy(y) > _hf_energy(x)


def test_jpeg_matches_pillow(photo):
    q = 40
    out = jpeg_roundtrip(photo, [q])
    arr = (photo[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=q)
    ref = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
    assert torch.equal(out[0], torch.from_numpy(ref).permute(2, 0, 1))
    assert not torch.equal(out, photo)


@pytest.mark.parametrize("scale", [2, 4])
def test_realesrgan_size_and_determinism(photo, scale):
    deg = RealESRGANDegradation(RealESRGANConfig(scale=scale))
    hr = photo.repeat(3, 1, 1, 1)
    a = deg(hr, torch.Generator().manual_seed(5))
    b = deg(hr, torch.Generator().manual_seed(5))
    c = deg(hr, torch.Generator().manual_seed(6))
    assert a.shape == (3, 3, 128 // scale, 128 // scale)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # per-sample randomness inside a batch
    assert a.min() >= 0 and a.max() <= 1


def test_realesrgan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        RealESRGANDegradation()(torch.rand(1, 3, 30, 30))


def test_simple_degradation_size_and_seed(photo):
    a = simple_degradation(photo, 4, torch.Generator().manual_seed(0))
    assert a.shape == (1, 3, 32, 32)
    assert torch.equal(a, simple_degradation(photo, 4, torch.Generator().manual_seed(0)))


def _write_odd_images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / "photo.webp")
    (folder / "notes.txt").write_text("not an image")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).save(folder / "tiny.png")


def test_image_loading_conversions(tmp_path):
    _write_odd_images(tmp_path / "in")
    for name in ("rgb.png", "gray.png", "rgba.png", "deep16.png", "photo.webp"):
        x = load_image(tmp_path / "in" / name)
        assert x.shape == (3, 20, 24) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    g = load_image(tmp_path / "in" / "gray.png")
    assert torch.equal(g[0], g[1])
    d16 = load_image(tmp_path / "in" / "deep16.png")
    raw = np.asarray(Image.open(tmp_path / "in" / "deep16.png"), dtype=np.float32) / 65535
    assert np.allclose(d16[0].numpy(), raw, atol=1e-6)


def test_image_folder_skips_bad_files_by_name(tmp_path, caplog):
    _write_odd_images(tmp_path / "in")
    ds = ImageFolder(tmp_path / "in")
    assert len(ds) == 5
    skipped = {p.name for p, _ in ds.skipped}
    assert skipped == {"notes.txt", "corrupt.png", "tiny.png"}
    assert "notes.txt" in caplog.text and "corrupt.png" in caplog.text
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_save_image_atomic_roundtrip(tmp_path):
    x = torch.rand(3, 10, 12)
    save_image(x, tmp_path / "a.png")
    y = load_image(tmp_path / "a.png")
    assert (x - y).abs().max() <= 0.5 / 255 + 1e-6
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_paired_patches():
    imgs = [torch.rand(3, 40, 40), torch.rand(3, 50, 60)]
    pp = PairedPatches(imgs, 32, 4, lambda hr, g: simple_degradation(hr, 4, g))
    hr, lr = pp.batch(5, torch.Generator().manual_seed(0))
    assert hr.shape == (5, 3, 32, 32) and lr.shape == (5, 3, 8, 8)


def _hr_folder(tmp_path):
    d = tmp_path / "hr"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    save_image(torch.rand(3, 80, 96, generator=g), d / "cat.png")
    (d / "cat.txt").write_text("a photo of a cat\n")
    save_image(torch.rand(3, 72, 72, generator=g), d / "wall.png")
    save_image(torch.rand(3, 20, 20, generator=g), d / "small.png")  # smaller than the patch
    (d / "broken.png").write_bytes(b"not a png")
    return d


def test_lr_set_from_your_own_hr_folder_with_captions(tmp_path, caplog):
    from sralign.train.candidates import LRSetConfig, make_lr_set

    cfg = LRSetConfig(n=12, patch=32, hr_dir=str(_hr_folder(tmp_path)))
    items = make_lr_set(cfg)
    assert len(items) == 12 and items[0].lr.shape == (3, 8, 8) and items[0].hr.shape == (3, 32, 32)
    assert {it.prompt for it in items} == {"a photo of a cat", None}  # both usable images are drawn
    again = make_lr_set(cfg)
    assert all(torch.equal(a.lr, b.lr) and a.prompt == b.prompt for a, b in zip(items, again))
    assert "broken.png" in caplog.text and "small.png" in caplog.text and "cat.txt" not in caplog.text
    with pytest.raises(ImageError, match="lr_set.patch"):
        make_lr_set(LRSetConfig(n=2, patch=128, hr_dir=cfg.hr_dir))


def test_store_keeps_captions(tmp_path):
    from sralign.data.store import CandidateStore

    st = CandidateStore(tmp_path / "s", create=True)
    st.add_lr("a", torch.rand(3, 8, 8), prompt="a brick wall")
    st.add_lr("b", torch.rand(3, 8, 8))
    assert st.prompt("a") == "a brick wall" and st.prompt("b") is None


# ---------------------------------------------------------------------- streamed LR sets
def _eager_lr_set(cfg):
    """The LR set built the simple way (reference): decode every HR image, cut all crops with
    ``random_crops_with_source``, degrade the whole set as one batch."""
    from sralign.data.images import random_crops_with_source
    if cfg.hr_dir:
        folder = ImageFolder(cfg.hr_dir)
        keep = [i for i in range(len(folder)) if min(folder[i].shape[1:]) >= cfg.patch]
        imgs, prompts = [folder[i] for i in keep], [folder.prompt(i) for i in keep]
    else:
        imgs, prompts = [im for _, im in load_bundled(cfg.split)], None
    g = torch.Generator().manual_seed(cfg.seed)
    hr, src = random_crops_with_source(imgs, cfg.n, cfg.patch, g)
    if cfg.degradation == "realesrgan":
        lr = RealESRGANDegradation(RealESRGANConfig(scale=cfg.scale))(hr, g)
    else:
        lr = simple_degradation(hr, cfg.scale, g)
    lr = (lr * 255).round() / 255
    return [(lr[i], hr[i], prompts[src[i]] if prompts else None) for i in range(cfg.n)]


@pytest.mark.parametrize("kind", ["bundled", "folder", "realesrgan"])
def test_streamed_lr_set_equals_the_eager_build(tmp_path, kind):
    from sralign.data.lrset import LRSet, LRSetConfig
    cfg = {"bundled": LRSetConfig(n=6, patch=48, seed=2),
           "folder": LRSetConfig(n=12, patch=32, hr_dir=str(_hr_folder(tmp_path))),
           "realesrgan": LRSetConfig(split="heldout", n=3, patch=32, seed=1, degradation="realesrgan")}[kind]
    ref = _eager_lr_set(cfg)
    got = list(LRSet(cfg))
    assert [it.lr_id for it in got] == [f"{cfg.split}{i:04d}" for i in range(cfg.n)]
    for (lr, hr, prompt), it in zip(ref, got):
        assert torch.equal(it.lr, lr) and torch.equal(it.hr, hr) and it.prompt == prompt
    if kind == "folder":
        assert {it.prompt for it in got} == {"a photo of a cat", None}


def test_lr_set_blocks_are_made_on_demand_from_their_seed(tmp_path, monkeypatch):
    import sralign.data.lrset as lrset
    cfg = lrset.LRSetConfig(n=5, patch=32, hr_dir=str(_hr_folder(tmp_path)), block=1)
    full = list(lrset.LRSet(cfg))
    reads = []
    real = lrset.load_image
    monkeypatch.setattr(lrset, "load_image", lambda p: reads.append(p) or real(p))
    for i in reversed(range(cfg.n)):  # any order, each item alone: the same bytes
        it = lrset.LRSet(cfg)[i]
        assert torch.equal(it.lr, full[i].lr) and torch.equal(it.hr, full[i].hr) and it.prompt == full[i].prompt
    assert len(reads) == cfg.n  # one HR file decoded per item, nothing else
    blocks2 = lrset.LRSet(lrset.LRSetConfig(n=5, patch=32, hr_dir=cfg.hr_dir, block=2))
    assert torch.equal(blocks2[4].lr, list(blocks2)[4].lr) and torch.equal(blocks2[1].hr, lrset.LRSet(blocks2.cfg)[1].hr)
    whole = lrset.LRSet(lrset.LRSetConfig(n=5, patch=32, hr_dir=cfg.hr_dir))
    assert not all(torch.equal(a.lr, b.lr) for a, b in zip(whole, full))  # block=1 is another set


def test_lr_set_in_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    from sralign.data.lrset import LRSet, LRSetConfig
    ds = LRSet(LRSetConfig(n=4, patch=32, hr_dir=str(_hr_folder(tmp_path)), block=1))
    batches = list(DataLoader(ds, batch_size=2, num_workers=1, collate_fn=LRSet.collate))
    ids, lr, hr, prompts = batches[1]
    assert ids == ["train0002", "train0003"] and lr.shape == (2, 3, 8, 8)
    assert torch.equal(lr, torch.stack([ds[2].lr, ds[3].lr])) and torch.equal(hr[1], ds[3].hr) and prompts[1] == ds[3].prompt


def test_lr_set_rejects_bad_settings():
    from sralign.data.lrset import LRSet, LRSetConfig
    with pytest.raises(ValueError, match="degradation"):
        LRSet(LRSetConfig(degradation="bsrgan"))
    with pytest.raises(ValueError, match="lr_set.block"):
        LRSet(LRSetConfig(block=-1))
    with pytest.raises(ValueError, match="multiple of lr_set.scale"):
        LRSet(LRSetConfig(patch=30))
