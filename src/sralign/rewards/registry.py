"""Metrics by name, pyiqa-style: ``get_metric("psnr")``, ``get_metric("pyiqa:musiq")``."""

from __future__ import annotations

from typing import Callable

from .base import FunctionMetric, Metric, MetricError

_REGISTRY: dict[str, Callable[..., Metric]] = {}


def register_metric(name: str, factory: Callable[..., Metric]) -> None:
    """Register ``factory(**kwargs) -> Metric`` under ``name`` (lower-case)."""
    _REGISTRY[name.lower()] = factory


def list_metrics() -> list[str]:
    return sorted(_REGISTRY)


def get_metric(name: str, **kwargs) -> Metric:
    """A metric by name. Built-ins: see ``list_metrics()``; ``pyiqa:NAME`` wraps any pyiqa
    metric (extra ``[iqa]``; weights from the local cache or ``weights_dir=``, never downloaded);
    ``gap:NAME`` reads a no-reference metric against the HR: −|NAME(SR) − NAME(HR)|
    (``rewards.relative``), e.g. ``gap:brisque``, ``gap:pyiqa:musiq``."""
    key = name.strip().lower()
    if key.startswith("gap:"):
        from .relative import HRRelativeMetric

        return HRRelativeMetric(get_metric(key[len("gap:"):], **kwargs))
    if key.startswith("pyiqa:"):
        from .pyiqa_adapter import PyIQAMetric

        return PyIQAMetric(key[len("pyiqa:"):], **kwargs)
    if key not in _REGISTRY:
        raise MetricError(
            f"unknown metric {name!r}; built-in: {', '.join(list_metrics())}; or any pyiqa metric as pyiqa:NAME; "
            f"or gap:NAME for a no-reference metric read against the HR"
        )
    return _REGISTRY[key](**kwargs)


def _builtin():
    from . import builtin
    from .brisque import brisque_score
    from .fullref import gmsd_y, ms_ssim_y
    from .functional import psnr_rgb, psnr_y
    from .niqe import niqe_s

    register_metric("psnr", lambda border=0: FunctionMetric("psnr", "FR", True, lambda s, h: psnr_y(s, h, border), description="PSNR on Y (dB)"))
    register_metric("psnr_rgb", lambda border=0: FunctionMetric("psnr_rgb", "FR", True, lambda s, h: psnr_rgb(s, h, border), description="PSNR on RGB (dB): sees colour shifts the Y-channel metrics miss"))
    register_metric("ssim", lambda border=0: FunctionMetric("ssim", "FR", True, lambda s, h: builtin.ssim_y(s, h, border), min_size=11, description="SSIM on Y"))
    register_metric("gmsd", lambda border=0: FunctionMetric("gmsd", "FR", False, lambda s, h: gmsd_y(s, h, border), min_size=8, description="GMSD on Y (Xue et al. 2014)"))
    register_metric("ms_ssim", lambda scales=None: FunctionMetric("ms_ssim", "FR", True, lambda s, h: ms_ssim_y(s, h, scales), min_size=11, description="MS-SSIM on Y (up to 3 scales, as many as the image fits; torchmetrics convention)"))
    register_metric("grad_fidelity", lambda: FunctionMetric("grad_fidelity", "FR", True, builtin.gradient_fidelity, description="-|log sharpness ratio to HR|"))
    register_metric("local_grad_fidelity", lambda patch=8: FunctionMetric("local_grad_fidelity", "FR", True, lambda s, h: builtin.local_gradient_fidelity(s, h, patch), min_size=8,
                                                                          description="-mean |log sharpness ratio to HR| over 8x8 patches (grain in flat areas and blur in textured ones both cost)"))
    register_metric("sharpness", lambda: FunctionMetric("sharpness", "NR", True, builtin.sharpness, description="mean Sobel magnitude of Y x10 (a diagnostic: it pays for grain; use gap:sharpness in a reward)"))
    register_metric("brisque", lambda: FunctionMetric("brisque", "NR", False, brisque_score, min_size=16, description="BRISQUE, published SVR model"))
    register_metric("niqe_s", lambda: FunctionMetric("niqe_s", "NR", False, niqe_s, min_size=32, description="NIQE-style, sralign pristine model (not official NIQE)"))


_builtin()
