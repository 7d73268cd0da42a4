"""Any pyiqa metric as an sralign ``Metric`` — without ever downloading.

pyiqa (optional extra ``[iqa]``; licence PolyForm-Noncommercial, so nothing of it is copied
here) fetches weights with ``load_file_from_url`` into ``$TORCH_HOME/hub/pyiqa``. While a
metric is being built, sralign replaces that function with one that only looks on disk (in
``weights_dir`` when given, else pyiqa's cache) and raises ``MissingWeightsError`` naming the
metric, the file and the folder; ``HF_HUB_OFFLINE=1`` is set so backbone look-ups cannot reach
a hub either.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from .base import MetricError


class MissingWeightsError(FileNotFoundError):
    pass


def _require_pyiqa():
    try:
        import pyiqa  # noqa: F401
    except Exception as e:  # ImportError, or torchvision failing beside a CPU torch
        raise MetricError(
            f"pyiqa metrics need the optional extra: pip install 'sralign[iqa]' "
            f"(pyiqa needs torchvision matching your torch; import failed: {type(e).__name__}: {e})"
        ) from None
    return pyiqa


@contextmanager
def _offline_weights(metric: str, weights_dir: str | os.PathLike | None):
    import pyiqa.utils.download_util as du

    modules = [du]
    try:
        import pyiqa.archs.arch_util as au

        modules.append(au)
    except Exception:
        pass
    originals = [(m, getattr(m, "load_file_from_url", None)) for m in modules]
    cache = Path(weights_dir) if weights_dir else Path(getattr(du, "DEFAULT_CACHE_DIR", Path(torch.hub.get_dir()) / "pyiqa"))

    def local_only(url, model_dir=None, progress=True, file_name=None, **_):
        name = file_name or os.path.basename(urlparse(url).path)
        folder = Path(weights_dir) if weights_dir else Path(model_dir) if model_dir else cache
        path = folder / name
        if not path.is_file():
            raise MissingWeightsError(
                f"pyiqa metric {metric!r} needs weight file {name!r}, not found in {folder}; "
                f"download it from {url} on a machine with network access and place it in that "
                f"folder (or pass --weights-dir DIR)"
            )
        return str(path)

    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    for m, _ in originals:
        if hasattr(m, "load_file_from_url"):
            m.load_file_from_url = local_only
    try:
        yield
    finally:
        for m, f in originals:
            if f is not None:
                m.load_file_from_url = f
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


class PyIQAMetric:
    """Wraps ``pyiqa.create_metric(name)``: batched, direction taken from pyiqa's ``lower_better``."""

    def __init__(self, name: str, weights_dir: str | os.PathLike | None = None, device: str = "cpu", **kwargs):
        pyiqa = _require_pyiqa()
        if name not in pyiqa.list_models():
            raise MetricError(f"pyiqa has no metric {name!r}; see pyiqa.list_models()")
        with _offline_weights(name, weights_dir):
            self._m = pyiqa.create_metric(name, device=torch.device(device), as_loss=False, **kwargs)
        self.name = f"pyiqa:{name}"
        self.kind = "FR" if self._m.metric_mode == "FR" else "NR"
        self.higher_is_better = not bool(self._m.lower_better)
        self.device = torch.device(device)

    def __call__(self, sr: Tensor, hr: Tensor | None = None) -> Tensor:
        sr = sr.clamp(0, 1).to(self.device)
        with torch.no_grad():
            if self.kind == "FR":
                if hr is None:
                    raise MetricError(f"metric {self.name} is full-reference: pass hr")
                out = self._m(sr, hr.clamp(0, 1).to(self.device))
            else:
                out = self._m(sr)
        return out.reshape(-1).float().cpu()
