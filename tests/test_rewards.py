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


def test_psnr_rgb_matches_skimage_and_sees_a_colour_shift_that_keeps_luma(photos):
    g = torch.Generator().manual_seed(0)
    noisy = (photos + 0.05 * torch.randn(photos.shape, generator=g)).clamp(0, 1)
    pr = get_metric("psnr_rgb")(noisy, photos)
    for i in range(len(photos)):
        ref = peak_signal_noise_ratio(photos[i].double().numpy(), noisy[i].double().numpy(), data_range=1.0)
        assert abs(float(pr[i]) - ref) < 1e-3
    # R and B moved against G so that BT.601 luma stays put: PSNR-Y cannot see it, PSNR-RGB can
    w = torch.tensor([65.481, 128.553, 24.966])
    d = torch.tensor([0.02, 0.0, -0.02 * w[0] / w[2]]).view(1, 3, 1, 1)
    mid = photos * 0.5 + 0.25  # no clipping
    shifted = mid + d
    assert float((rgb_to_y(shifted) - rgb_to_y(mid)).abs().max()) < 1e-5
    assert float(get_metric("psnr")(shifted, mid).min()) > 90
    assert float(get_metric("psnr_rgb")(shifted, mid).max()) < 35


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


def test_hybrid_nr_share_weights_the_sides_hand_computed():
    raw = {
        "psnr": torch.tensor([[20.0, 30.0, 25.0]]),
        "ssim": torch.tensor([[0.5, 0.7, 0.9]]),
        "brisque": torch.tensor([[10.0, 40.0, 20.0]]),
    }
    fr = (torch.tensor([0.0, 1.0, 0.5]) + torch.tensor([0.0, 0.5, 1.0])) / 2
    nr = torch.tensor([1.0, 0.0, 2 / 3])
    h = HybridReward.from_names(["psnr", "ssim"], ["brisque"], nr_share=0.25)
    assert (h.fr_weight, h.nr_weight) == (0.75, 0.25)
    assert torch.allclose(h.from_scores(raw).total[0], 0.75 * fr + 0.25 * nr)
    # the two sides rank the candidates differently: the share decides which one wins
    assert h.from_scores(raw).total[0].argmax() == 2
    assert HybridReward.from_names(["psnr", "ssim"], ["brisque"], nr_share=0.9).from_scores(raw).total[0].argmax() == 0
    assert torch.allclose(HybridReward.from_names(["psnr", "ssim"], ["brisque"], nr_share=0.0).from_scores(raw).total[0], fr)
    with pytest.raises(MetricError, match="nr_share"):
        HybridReward.from_names(["psnr"], ["brisque"], nr_share=1.5)


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


# ------------------------------------------------------------------ full-reference perceptual (GMSD, MS-SSIM)
def _gmsd_numpy(a_rgb, b_rgb, c=170.0):
    """GMSD as published (Xue et al. 2014, MATLAB recipe), written independently with scipy."""
    from scipy.signal import convolve2d

    def prep(x):
        y = _y_np(x) * 255.0
        y = convolve2d(y, np.ones((2, 2)) / 4, mode="full")[1:, 1:]  # MATLAB conv2(...,'same') for a 2x2 kernel
        return y[::2, ::2]

    dx = np.array([[1, 0, -1]] * 3, dtype=np.float64) / 3
    mags = []
    for x in (a_rgb, b_rgb):
        y = prep(x)
        gx, gy = convolve2d(y, dx, mode="same"), convolve2d(y, dx.T, mode="same")
        mags.append(np.sqrt(gx**2 + gy**2))
    gms = (2 * mags[0] * mags[1] + c) / (mags[0] ** 2 + mags[1] ** 2 + c)
    return gms.std(ddof=1)


def test_gmsd_matches_published_formula(photos):
    g = torch.Generator().manual_seed(0)
    noisy = (photos + 0.05 * torch.randn(photos.shape, generator=g)).clamp(0, 1)
    k = torch.from_numpy(gaussian_kernel2d(21, 1.5, 1.5, 0.0)).float()[None].repeat(4, 1, 1)
    blurred = filter2d(photos, k)
    m = get_metric("gmsd")
    assert m.kind == "FR" and not m.higher_is_better
    for dist in (noisy, blurred):
        ours = m(dist, photos)
        for i in range(len(photos)):
            assert abs(float(ours[i]) - _gmsd_numpy(dist[i], photos[i])) < 1e-5
    assert torch.allclose(m(photos, photos), torch.zeros(4), atol=1e-7)
    # stronger noise, larger deviation
    worse = (photos + 0.15 * torch.randn(photos.shape, generator=g)).clamp(0, 1)
    assert (m(worse, photos) > m(noisy, photos)).all()


def test_ms_ssim_matches_torchmetrics_in_chunks_of_any_size():
    tm = pytest.importorskip("torchmetrics.functional.image")  # in the dev extra: this test runs in CI
    from sralign.rewards.fullref import MS_SSIM_WEIGHTS, ms_ssim_y

    g = torch.Generator().manual_seed(3)
    for side, scales in ((64, 3), (64, 2), (48, 1), (96, 3), (48, 3), (33, 2)):
        x = torch.rand(5, 3, side, side, generator=g, dtype=torch.float64)
        y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
        w = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
        ref = tm.multiscale_structural_similarity_index_measure(
            rgb_to_y(x), rgb_to_y(y), gaussian_kernel=True, kernel_size=11, sigma=1.5, data_range=1.0,
            betas=tuple((w / w.sum()).tolist()), normalize="relu", reduction="none").reshape(-1)
        ours = ms_ssim_y(x, y, scales)
        assert (ours - ref).abs().max() < 1e-7, (side, scales)
        assert torch.equal(ms_ssim_y(x, y, scales, chunk=2), ours)  # chunking changes nothing
        assert (ours < 1).all() and torch.allclose(ms_ssim_y(x, x, scales), torch.ones(5, dtype=torch.float64))


def test_ms_ssim_one_scale_is_ssim_and_identity_is_one(photos):
    from sralign.rewards.fullref import ms_ssim_y

    g = torch.Generator().manual_seed(0)
    noisy = (photos + 0.05 * torch.randn(photos.shape, generator=g)).clamp(0, 1)
    # one scale is SSIM; torchmetrics reflect-pads the border where skimage's convention drops it
    one, ref = ms_ssim_y(noisy, photos, scales=1), get_metric("ssim")(noisy, photos)
    assert torch.allclose(one, ref, atol=0.02) and not torch.allclose(one, torch.ones(4), atol=0.05)
    m = get_metric("ms_ssim")
    assert torch.allclose(m(photos, photos), torch.ones(4), atol=1e-6)
    assert (m(noisy, photos) < 0.99).all()
    # by default as many scales as fit (at most 3): 2 at 32 px, 1 (SSIM) at 16 px; a set number is kept
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    assert torch.equal(m(a, b), ms_ssim_y(a, b, scales=2)) and not torch.allclose(m(a, b), ms_ssim_y(a, b, scales=1))
    assert torch.equal(m(a[..., :16, :16], b[..., :16, :16]), ms_ssim_y(a[..., :16, :16], b[..., :16, :16], scales=1))
    assert torch.equal(m(photos, noisy), ms_ssim_y(photos, noisy, scales=3))
    with pytest.raises(MetricError, match="ms_ssim with 3 scales needs images of at least 41x41"):
        get_metric("ms_ssim", scales=3)(a, b)


# ------------------------------------------------------------------ no-reference metrics read against the HR
def test_gap_metric_hand_computed_and_hr_scored_once(photos):
    from sralign.rewards.base import FunctionMetric
    from sralign.rewards.relative import HRRelativeMetric

    calls = []

    def mean_y(x):
        calls.append(x.shape[0])
        return x.mean(dim=(1, 2, 3))

    gap = HRRelativeMetric(FunctionMetric("mean", "NR", True, mean_y))
    assert gap.name == "gap:mean" and gap.kind == "FR" and gap.side == "NR" and gap.higher_is_better
    hr = torch.stack([torch.full((3, 8, 8), 0.5), torch.full((3, 8, 8), 0.2)]).repeat_interleave(3, 0)  # 2 groups of 3
    sr = torch.stack([torch.full((3, 8, 8), v) for v in (0.5, 0.7, 0.1, 0.2, 0.0, 0.6)])
    out = gap(sr, hr)
    assert torch.allclose(out, torch.tensor([0.0, -0.2, -0.4, 0.0, -0.2, -0.4]), atol=1e-6)
    assert calls == [6, 1, 1]  # SR batch once, each group's HR once
    with pytest.raises(MetricError, match="gap:mean reads mean against the HR: pass hr"):
        gap(sr)
    with pytest.raises(MetricError, match="gap: takes a no-reference metric"):
        get_metric("gap:psnr")
    real = get_metric("gap:brisque")
    assert torch.allclose(real(photos, photos), torch.zeros(4), atol=1e-4)
    b = get_metric("brisque")
    noisy = (photos + 0.05 * torch.randn(photos.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert torch.allclose(real(noisy, photos), -(b(noisy) - b(photos)).abs(), atol=1e-4)


def test_hybrid_takes_gap_metrics_on_the_nr_side_and_needs_hr(photos):
    h = HybridReward.from_names(["gmsd"], ["gap:brisque"])
    assert [m.name for m in h.nr] == ["gap:brisque"]
    with pytest.raises(MetricError, match="gap:brisque is a no-reference metric; list it under the NR set"):
        HybridReward.from_names(["gap:brisque"], [])
    with pytest.raises(MetricError, match="pass hr"):
        HybridReward.from_names([], ["gap:brisque"])(photos[:1, None], None)


def _distorted_versions(hr):
    """Blurred (σ 1, 2), noised (σ 0.02, 0.05) and over-sharpened (unsharp mask 0.5, 1.5) copies."""
    g = torch.Generator().manual_seed(3)
    out = []
    for s in (1.0, 2.0):
        k = torch.from_numpy(gaussian_kernel2d(21, s, s, 0.0)).float()[None].repeat(hr.shape[0], 1, 1)
        out.append(filter2d(hr, k))
    for s in (0.02, 0.05):
        out.append((hr + s * torch.randn(hr.shape, generator=g)).clamp(0, 1))
    k = torch.from_numpy(gaussian_kernel2d(21, 1.5, 1.5, 0.0)).float()[None].repeat(hr.shape[0], 1, 1)
    for a in (0.5, 1.5):
        out.append((hr + a * (hr - filter2d(hr, k))).clamp(0, 1))
    return out


def test_default_reward_optimum_is_the_hr():
    """The shipped default reward ranks the HR itself first among blurred, noised and over-sharpened
    versions of it, on bundled crops of both splits."""
    from sralign.rewards.hybrid import DEFAULT_FR, DEFAULT_NR
    from sralign.train.offline_config import DP2OConfig
    from sralign.train.online_config import OnlineConfig

    assert list(DEFAULT_FR) == DP2OConfig().fr_metrics == OnlineConfig().fr_metrics
    assert list(DEFAULT_NR) == DP2OConfig().nr_metrics == OnlineConfig().nr_metrics
    assert "sharpness" not in DEFAULT_FR + DEFAULT_NR
    hr = torch.stack([center_crop(img, 64) for _, img in load_bundled("train")[:6] + load_bundled("heldout")])
    group = torch.stack([hr, *_distorted_versions(hr)], 1)  # [n, 7, 3, 64, 64], HR first
    out = HybridReward.from_names(list(DEFAULT_FR), list(DEFAULT_NR))(group, hr)
    assert torch.allclose(out.total[:, 0], torch.ones(len(hr)))  # every term at its best
    assert (out.total[:, 1:] < 1 - 1e-3).all()


def test_configs_take_gap_metrics_on_the_nr_side_only():
    from sralign.config import ConfigError, load_config
    from sralign.train.offline_config import DP2OConfig

    assert load_config(DP2OConfig, None, ["nr_metrics=[gap:sharpness,gap:pyiqa:musiq]"]).nr_metrics == ["gap:sharpness", "gap:pyiqa:musiq"]
    with pytest.raises(ConfigError, match="fr_metrics lists 'gap:brisque', a no-reference metric; it belongs in the NR list"):
        load_config(DP2OConfig, None, ["fr_metrics=[gap:brisque]"])


def test_attribute_reward_default_optimum_is_the_hr():
    """GDPO-SR's attribute-aware reward with its default texture metrics (the default hybrid's NR
    half, read against the HR) ranks the HR first among blurred, noised and over-sharpened copies,
    on bundled crops of both splits, under both texture rules and per_region."""
    from sralign.rewards.attribute import DEFAULT_NR_ATTRIBUTE
    from sralign.rewards.hybrid import DEFAULT_NR
    from sralign.train.online_config import GDPOConfig

    cfg = GDPOConfig()
    assert cfg.reward == "attribute" and cfg.nr_metrics == list(DEFAULT_NR_ATTRIBUTE) == list(DEFAULT_NR)
    assert GDPOConfig.with_preset("authors").nr_metrics == cfg.nr_metrics  # the preset leaves the metrics alone
    assert all(n.startswith("gap:") for n in cfg.nr_metrics)
    hr = torch.stack([center_crop(img, 64) for _, img in load_bundled("train")[:6] + load_bundled("heldout")])
    group = torch.stack([hr, *_distorted_versions(hr)], 1)  # [n, 7, 3, 64, 64], HR first
    for kw in ({}, {"rule": "authors"}, {"per_region": True}):
        out = AttributeReward.from_names(cfg.nr_metrics, **kw)(group, hr)
        assert torch.allclose(out.total[:, 0], torch.ones(len(hr))), kw  # PSNR and every gap at their best
        assert (out.total[:, 1:] < 1 - 1e-3).all(), kw
        for n in cfg.nr_metrics:
            assert torch.allclose(out.per_metric[n][:, 0], torch.zeros(len(hr)), atol=1e-4)


def test_attribute_reward_raw_nr_prefers_grain_over_the_hr():
    """Why the default changed: with raw BRISQUE on the texture side, some over-sharpened or noised
    copy beats the HR on at least one crop (the raw optimum is not the truth)."""
    hr = torch.stack([center_crop(img, 64) for _, img in load_bundled("train")[:6] + load_bundled("heldout")])
    group = torch.stack([hr, *_distorted_versions(hr)], 1)
    raw = AttributeReward.from_names(["brisque"])(group, hr).per_metric["brisque"]
    assert (raw[:, 1:].min(1).values < raw[:, 0]).any()


def test_attribute_reward_hands_the_hr_to_gap_metrics_only(photos):
    from sralign.rewards.base import FunctionMetric
    from sralign.rewards.relative import HRRelativeMetric

    seen = []

    def mean_y(x):
        seen.append(x.clone())
        return x.mean(dim=(1, 2, 3))

    raw_calls = []

    def raw_fn(x):
        raw_calls.append(x.shape[0])
        return x.std(dim=(1, 2, 3))

    gap = HRRelativeMetric(FunctionMetric("mean", "NR", True, mean_y))
    raw = FunctionMetric("spread", "NR", True, raw_fn)  # NR: calling it with hr would not reach fn anyway
    hr = photos[:2]
    group = torch.stack([hr, (hr + 0.1).clamp(0, 1), hr * 0.5], 1)  # [2,3,3,96,96]
    out = AttributeReward([gap, raw])(group, hr)
    assert out.total.shape == (2, 3) and raw_calls == [6]
    # the gap metric saw the SR batch and each group's HR: −|mean(SR) − mean(HR)|
    assert any(torch.equal(s, hr[:1]) for s in seen) and any(torch.equal(s, hr[1:2]) for s in seen)
    want = -(group.mean(dim=(2, 3, 4)) - hr.mean(dim=(1, 2, 3))[:, None]).abs()
    assert torch.allclose(out.per_metric["gap:mean"], want, atol=1e-6)
    assert torch.allclose(out.per_metric["gap:mean"][:, 0], torch.zeros(2))
    assert torch.allclose(out.per_metric["spread"], group.std(dim=(2, 3, 4)), atol=1e-6)
    # by name, through the registry: gap:brisque equals −|brisque(SR) − brisque(HR)|; raw brisque still works
    r = AttributeReward.from_names(["gap:brisque", "brisque"])(group, hr)
    b = get_metric("brisque")
    assert torch.allclose(r.per_metric["gap:brisque"], -(r.per_metric["brisque"] - b(hr)[:, None]).abs(), atol=1e-3)
    assert torch.allclose(r.per_metric["brisque"], b(group.flatten(0, 1)).reshape(2, 3), atol=1e-4)
    with pytest.raises(MetricError, match="gmsd is full-reference; the attribute reward's texture side takes no-reference"):
        AttributeReward.from_names(["gmsd"])


def test_gdpo_config_takes_gap_metrics_for_the_attribute_reward():
    from sralign.config import ConfigError, load_config
    from sralign.train.online import build_reward
    from sralign.train.online_config import GDPOConfig

    cfg = load_config(GDPOConfig, None, ["nr_metrics=[gap:sharpness,brisque]"])
    r = build_reward(cfg)
    assert isinstance(r, AttributeReward) and r.names == ["psnr", "gap:sharpness", "brisque"]
    assert isinstance(build_reward(GDPOConfig()), AttributeReward) and build_reward(GDPOConfig()).names == ["psnr", "gap:brisque", "gap:niqe_s"]
    with pytest.raises(ConfigError, match="nr_metrics lists 'gmsd', a full-reference metric"):
        load_config(GDPOConfig, None, ["nr_metrics=[gmsd]"])


def test_online_hybrid_takes_the_nr_weight_and_it_is_range_checked():
    from sralign.config import ConfigError, load_config, validate
    from sralign.train.online import build_reward
    from sralign.train.online_config import DGPOConfig

    r = build_reward(load_config(DGPOConfig, None, ["nr_weight=0.25"]))
    assert isinstance(r, HybridReward) and (r.fr_weight, r.nr_weight) == (0.75, 0.25)
    with pytest.raises(ConfigError, match=r"nr_weight must be in \[0, 1\]"):
        validate(load_config(DGPOConfig, None, ["nr_weight=-0.1"]))


def test_attribute_reward_ranks_stored_scores_like_the_call(photos):
    """``ranks`` (eval: several policies' samples pooled, scored once) gives the reward the call
    gives; the hybrid's ``ranks`` is its ``from_scores``."""
    from sralign.rewards.hybrid import score_group

    hr = photos[:3]
    g = torch.Generator().manual_seed(4)
    group = torch.stack([hr, *[(hr + s * torch.randn(hr.shape, generator=g)).clamp(0, 1) for s in (0.01, 0.03, 0.08)]], 1)
    for rule in ("sralign", "authors"):
        r = AttributeReward.from_names(["gap:brisque", "sharpness"], rule=rule)
        assert [m.name for m in r.metrics] == r.names == ["psnr", "gap:brisque", "sharpness"]
        direct = r(group, hr)
        stored = r.ranks(score_group(r.metrics, group, hr), hr)
        assert torch.allclose(direct.total, stored.total, atol=1e-5)
        f_smooth, f_tex = r.areas(hr)
        assert torch.allclose(f_smooth + f_tex, torch.ones(3, 1)) and ((f_tex > 0) & (f_tex < 1)).any()
    with pytest.raises(MetricError, match="per_region=True scores composites"):
        AttributeReward.from_names(["brisque"], per_region=True).ranks({}, hr)
    h = HybridReward.from_names(["gmsd"], ["gap:brisque"])
    raw = score_group(h.metrics, group, hr)
    assert torch.equal(h.ranks(raw, hr).total, h.from_scores(raw).total)


def test_local_gradient_fidelity_matches_its_formula_written_with_scipy():
    """−mean over 8×8 patches |log((G_sr + c)/(G_hr + c))|, G = mean Sobel magnitude of BT.601 Y
    (replicate borders), c = 2/255 — recomputed with scipy.ndimage and numpy."""
    import numpy as np
    from scipy import ndimage

    from sralign.rewards.builtin import local_gradient_fidelity

    g = torch.Generator().manual_seed(5)
    hr = torch.rand(2, 3, 20, 24, generator=g, dtype=torch.float64)  # 20 = 2·8 + 4: a partial patch row
    sr = (hr + 0.1 * torch.randn(hr.shape, generator=g, dtype=torch.float64)).clamp(0, 1)

    def patch_grad(x):
        y = (x[:, 0] * 65.481 + x[:, 1] * 128.553 + x[:, 2] * 24.966) / 255 + 16 / 255
        out = []
        for img in y.numpy():
            gx = ndimage.correlate(img, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float), mode="nearest")
            gy = ndimage.correlate(img, np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], float), mode="nearest")
            mag = np.sqrt(gx**2 + gy**2 + 1e-12)
            out.append([[mag[i:i + 8, j:j + 8].mean() for j in range(0, 24, 8)] for i in range(0, 20, 8)])
        return np.array(out)

    c = 2 / 255
    want = -np.abs(np.log(patch_grad(sr) + c) - np.log(patch_grad(hr) + c)).reshape(2, -1).mean(1)
    got = local_gradient_fidelity(sr, hr).numpy()
    assert np.allclose(got, want, atol=1e-10), (got, want)
    assert torch.equal(local_gradient_fidelity(hr, hr), torch.zeros(2, dtype=hr.dtype))


def test_local_gradient_fidelity_does_not_let_grain_pay_for_blur():
    """An HR half flat, half textured: blurring the texture and adding grain to the flat half can
    bring the image's *total* gradient energy back to the HR's, so the one-ratio grad_fidelity
    prefers it to the blur alone; the patch-wise one ranks it below the blur alone."""
    from sralign.rewards.builtin import gradient_fidelity, local_gradient_fidelity

    g = torch.Generator().manual_seed(0)
    hr = torch.full((1, 3, 64, 64), 0.5)
    hr[..., 32:] = torch.rand(1, 3, 64, 32, generator=g)
    blur = hr.clone()
    blur[..., 32:] = torch.nn.functional.avg_pool2d(hr[..., 32:], 5, stride=1, padding=2, count_include_pad=False)
    grainy = blur.clone()
    grainy[..., :32] += 0.05 * torch.randn(1, 3, 64, 32, generator=g)
    assert gradient_fidelity(grainy, hr) > gradient_fidelity(blur, hr)  # the global ratio is fooled
    assert local_gradient_fidelity(grainy, hr) < local_gradient_fidelity(blur, hr) < 0
