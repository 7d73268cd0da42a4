import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sralign.data.degradation import filter2d, gaussian_kernel2d, jpeg_roundtrip
from sralign.data.images import center_crop, load_bundled
from sralign.rewards.attribute import AttributeReward, masked_psnr_y, texture_map
from sralign.rewards.base import MetricError
from sralign.rewards.functional import rgb_to_y
from sralign.rewards.hybrid import HybridReward, group_minmax
from sralign.rewards.registry import get_metric, list_metrics


@pytest.fixture(scope="module")
def photos():
    return torch.stack([center_crop(img, 96) for _, img in load_bundled("heldout")])


def _y_np(x):
    return rgb_to_y(x[None].double())[0, 0].numpy()


def test_registry_kinds_and_unknown_name():
    assert {"psnr", "ssim", "brisque", "niqe_s", "sharpness"} <= set(list_metrics())
    assert get_metric("psnr").kind == "FR" and get_metric("psnr").higher_is_better
    assert get_metric("brisque").kind == "NR" and not get_metric("brisque").higher_is_better
    with pytest.raises(MetricError, match="unknown metric 'musiq'.*pyiqa:NAME"):
        get_metric("musiq")


def test_psnr_ssim_match_skimage(photos):
    g = torch.Generator().manual_seed(0)
    noisy = (photos + 0.05 * torch.randn(photos.shape, generator=g)).clamp(0, 1)
    ps = get_metric("psnr")(noisy, photos)
    ss = get_metric("ssim")(noisy, photos)
    for i in range(len(photos)):
        a, b = _y_np(noisy[i]), _y_np(photos[i])
        assert abs(float(ps[i]) - peak_signal_noise_ratio(b, a, data_range=1.0)) < 1e-3
        ref = structural_similarity(b, a, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(float(ss[i]) - ref) < 1e-3
    assert torch.allclose(get_metric("psnr", border=4)(photos, photos), torch.full((4,), 100.0), atol=1e-3)


def test_brisque_matches_package_scorer(photos):
    brisque = pytest.importorskip("brisque")  # the package's scorer needs OpenCV too
    cv2 = pytest.importorskip("cv2")
    import skimage.color

    ob = brisque.BRISQUE(url=False)
    ours = get_metric("brisque")(photos)
    for i in range(len(photos)):
        u8 = (photos[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        gray = skimage.color.rgb2gray(u8)
        f1 = ob.calculate_brisque_features(gray, kernel_size=7, sigma=7 / 6)
        f2 = ob.calculate_brisque_features(cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC), kernel_size=7, sigma=7 / 6)
        feats = np.array([float(np.asarray(v).reshape(-1)[0]) for v in np.concatenate((f1, f2))])
        ref = ob.calculate_image_quality_score(feats)
        assert abs(float(ours[i]) - ref) < 1e-2


@pytest.mark.parametrize("distortion", ["blur", "noise", "jpeg"])
@pytest.mark.parametrize("metric", ["brisque", "niqe_s"])
def test_nr_metrics_monotone_in_distortion_strength(photos, distortion, metric):
    m = get_metric(metric)
    g = torch.Generator().manual_seed(0)
    x = photos[:3]
    levels = {"blur": [0.8, 1.6, 3.2], "noise": [0.02, 0.05, 0.1], "jpeg": [60, 25, 5]}[distortion]
    scores = [m(x).mean()]
    for lv in levels:
        if distortion == "blur":
            k = torch.from_numpy(gaussian_kernel2d(21, lv, lv, 0.0)).float()[None].repeat(3, 1, 1)
            y = filter2d(x, k)
        elif distortion == "noise":
            y = (x + lv * torch.randn(x.shape, generator=g)).clamp(0, 1)
        else:
            y = jpeg_roundtrip(x, [lv] * 3)
        scores.append(m(y).mean())
    s = torch.stack(scores)
    assert (s[1:] > s[:-1]).all(), f"{metric} under {distortion}: {s.tolist()}"  # lower is better


def test_sharpness_orders_blur(photos):
    m = get_metric("sharpness")
    k = torch.from_numpy(gaussian_kernel2d(21, 2.0, 2.0, 0.0)).float()[None].repeat(4, 1, 1)
    assert (m(photos) > m(filter2d(photos, k))).all()


def test_metric_errors_name_the_metric(photos):
    with pytest.raises(MetricError, match="psnr is full-reference"):
        get_metric("psnr")(photos)
    with pytest.raises(MetricError, match="niqe_s: needs images of at least 32"):
        get_metric("niqe_s")(torch.rand(1, 3, 16, 16))


# ------------------------------------------------------------------ group normalisation / hybrid
def test_group_minmax_hand_computed_and_zero_range():
    x = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    assert torch.allclose(group_minmax(x), torch.tensor([[0.0, 1.0, 0.5], [0.5, 0.5, 0.5]]))
    assert torch.allclose(group_minmax(x, higher_is_better=False), torch.tensor([[1.0, 0.0, 0.5], [0.5, 0.5, 0.5]]))


def _hybrid():
    return HybridReward.from_names(["psnr", "ssim"], ["brisque"])


def test_hybrid_hand_computed():
    h = _hybrid()
    raw = {
        "psnr": torch.tensor([[20.0, 30.0, 25.0]]),
        "ssim": torch.tensor([[0.5, 0.7, 0.9]]),
        "brisque": torch.tensor([[10.0, 40.0, 20.0]]),  # lower better
    }
    out = h.from_scores(raw)
    fr = (torch.tensor([0.0, 1.0, 0.5]) + torch.tensor([0.0, 0.5, 1.0])) / 2
    nr = torch.tensor([1.0, 0.0, 2 / 3])
    assert torch.allclose(out.total[0], 0.5 * fr + 0.5 * nr)
    assert set(out.normalized) == {"psnr", "ssim", "brisque"}


def test_hybrid_invariant_to_metric_offset_and_scale():
    h = _hybrid()
    g = torch.Generator().manual_seed(0)
    raw = {k: torch.rand(3, 5, generator=g) for k in ("psnr", "ssim", "brisque")}
    a = h.from_scores(raw).total
    raw2 = dict(raw, psnr=raw["psnr"] + 7.0, brisque=raw["brisque"] * 3 - 2)
    assert torch.allclose(a, h.from_scores(raw2).total, atol=1e-6)


def test_hybrid_zero_range_group_gives_half_not_nan():
    h = HybridReward.from_names(["psnr"], ["sharpness"])
    out = h.from_scores({"psnr": torch.full((2, 4), 30.0), "sharpness": torch.full((2, 4), 1.0)})
    assert torch.equal(out.total, torch.full((2, 4), 0.5))


def test_hybrid_reports_nan_with_metric_name():
    h = _hybrid()
    raw = {"psnr": torch.rand(2, 3), "ssim": torch.rand(2, 3), "brisque": torch.rand(2, 3)}
    raw["ssim"][1, 2] = float("nan")
    with pytest.raises(MetricError, match=r"metric ssim returned nan at position \[1, 2\]"):
        h.from_scores(raw)
    raw["ssim"][1, 2] = float("inf")
    with pytest.raises(MetricError, match="metric ssim returned inf"):
        h.from_scores(raw)


def test_hybrid_end_to_end_prefers_clean(photos):
    h = HybridReward.from_names(["psnr", "ssim"], ["brisque", "niqe_s"])
    g = torch.Generator().manual_seed(0)
    hr = photos[:2]
    group = torch.stack([hr + s * torch.randn(hr.shape, generator=g) for s in (0.0, 0.03, 0.08)], 1).clamp(0, 1)
    out = h(group, hr)
    assert out.total.shape == (2, 3)
    assert (out.total[:, 0] > out.total[:, 2]).all()


def test_hybrid_rejects_wrong_sides():
    with pytest.raises(MetricError, match="no-reference"):
        HybridReward.from_names(["brisque"], [])


# ------------------------------------------------------------------ attribute-aware
def test_texture_map_smooth_vs_textured():
    flat = torch.full((1, 3, 40, 40), 0.5)
    g = torch.Generator().manual_seed(0)
    noisy = torch.rand(1, 3, 40, 40, generator=g)
    half = flat.clone()
    half[..., :, 20:] = noisy[..., :, 20:]
    m = texture_map(torch.cat([flat, noisy, half]))
    assert m.shape == (3, 1, 40, 40)
    assert m[0].sum() == 0 and m[1].mean() == 1
    assert m[2, 0, :, :20].sum() == 0 and m[2, 0, :, 20:].mean() == 1


def test_attribute_reward_hand_computed():
    r = AttributeReward.from_names(["brisque"])
    raw = {"psnr": torch.tensor([[20.0, 30.0]]), "brisque": torch.tensor([[10.0, 50.0]])}
    out = r.from_scores(raw, f_smooth=torch.tensor([[0.25]]), f_tex=torch.tensor([[0.75]]))
    # psnr norm [0,1]; brisque norm (lower better) [1,0]
    assert torch.allclose(out.total, torch.tensor([[0.75, 0.25]]))


def test_attribute_reward_end_to_end_and_per_region(photos):
    hr = photos[:2]
    g = torch.Generator().manual_seed(1)
    group = torch.stack([hr + s * torch.randn(hr.shape, generator=g) for s in (0.0, 0.02, 0.06)], 1).clamp(0, 1)
    for per_region in (False, True):
        out = AttributeReward.from_names(["brisque", "sharpness"], per_region=per_region)(group, hr)
        assert out.total.shape == (2, 3) and torch.isfinite(out.total).all()
        assert (out.total[:, 0] >= out.total[:, 2]).all()


def test_masked_psnr_counts_only_masked_pixels():
    hr = torch.zeros(1, 3, 8, 8)
    sr = hr.clone()
    sr[..., :, 4:] = 1.0  # error only on the right half
    left = torch.zeros(1, 1, 8, 8)
    left[..., :, :4] = 1
    assert masked_psnr_y(sr, hr, left) > 90
    assert masked_psnr_y(sr, hr, 1 - left) < 10


# ----------------------------------------------------------------------------- GDPO-SR's texture map as the authors compute it
def test_opencv_gray_of_rgb_hand_computed():
    from sralign.rewards.attribute import opencv_gray_of_rgb

    # the authors truncate to 8 bits, then OpenCV's BGR->gray reads channel 0 as blue: on RGB data
    # red gets weight 1868/2^14 (0.114) and blue 4899/2^14 (0.299); fixed point, rounded (+2^13 >> 14)
    px = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [0.999, 0.999, 0.999], [0.5, 0.5, 0.5]])
    img = px.T.reshape(1, 3, 1, 5)
    g = (opencv_gray_of_rgb(img) * 255).round().flatten().tolist()
    want = [(1868 * 255 + 8192) >> 14, (4899 * 255 + 8192) >> 14, (9617 * 255 + 8192) >> 14, 254, 127]
    assert want == [29, 76, 150, 254, 127] and g == want
    # BT.601 on the right channels would give red 81 (16 + 65.481) and blue 41
    assert round(float(rgb_to_y(img)[0, 0, 0, 0]) * 255) == 81


def test_texture_map_authors_edge_blocks_scale_the_threshold():
    from sralign.rewards.attribute import block_entropy

    # 10×14 image: one full 10×10 block (flat) and a 10×4 edge strip holding a step edge. The
    # authors' rule: a block is texture when entropy·h·w > 50, so this strip needs entropy > 1.25
    # (a full block 0.5); with equal R, G, B the authors' gray is exactly the 8-bit value.
    hr = torch.zeros(1, 3, 10, 14)
    hr[..., 12:] = 153 / 255
    strip = hr[:, :1, :, 10:].double()
    e = float(block_entropy(strip, drop_out_of_range=True))
    assert 0.5 < e < 1.25  # texture by the full-block threshold, smooth by the authors' edge rule
    m = texture_map(hr, rule="authors")
    assert m.shape == (1, 1, 10, 14) and m.sum() == 0
    # a busier strip (checkerboard) clears entropy·40 > 50
    hr2 = torch.zeros(1, 3, 10, 14)
    hr2[..., ::2, 10::2] = 0.5
    e2 = float(block_entropy(hr2[:, :1, :, 10:].double(), drop_out_of_range=True))
    m2 = texture_map(hr2, rule="authors")
    assert e2 * 40 > 50 and m2[..., 10:].min() == 1 and m2[..., :10].max() == 0
    with pytest.raises(ValueError, match="texture rule"):
        texture_map(hr, rule="opencv")


def test_texture_map_keeps_dtype_and_device_under_float64_default():
    hr = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    want = texture_map(hr)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for rule in ("sralign", "authors"):
            m = texture_map(hr.double(), rule=rule)
            assert m.device == hr.device and torch.isfinite(m).all()
        assert torch.equal(texture_map(hr.double()).float(), want)
    finally:
        torch.set_default_dtype(prev)
