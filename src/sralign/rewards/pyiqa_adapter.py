"""Any pyiqa metric as an sralign ``Metric`` — without ever downloading.

pyiqa (optional extra ``[iqa]``; licence PolyForm-Noncommercial, so nothing of it is copied
here) fetches weights into ``$TORCH_HOME/hub/pyiqa`` through ``torch.hub.download_url_to_file``
when a file is not cached. While a metric is being built, sralign points pyiqa's cache at
``weights_dir`` (when given) and replaces the download function with one that raises
``MissingWeightsError`` naming the metric, the file and the folder; ``HF_HUB_OFFLINE=1`` is set
so backbone look-ups cannot reach a hub either.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

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
    """While building a pyiqa metric: look for weights in ``weights_dir`` (or pyiqa's cache) and
    turn every download attempt into ``MissingWeightsError``."""
    import torch.hub as hub

    import pyiqa.utils.download_util as du

    def refuse(url, dst, *args, **kwargs):
        raise MissingWeightsError(
            f"pyiqa metric {metric!r} needs weight file {os.path.basename(str(dst))!r}, not found in "
            f"{os.path.dirname(str(dst))}; sralign never downloads: fetch {url} on a machine with network "
            f"access and put it in that folder (or pass --weights-dir DIR)"
        )

    saved = {"du_dl": du.download_url_to_file, "hub_dl": hub.download_url_to_file, "cache": du.DEFAULT_CACHE_DIR,
             "env": os.environ.get("HF_HUB_OFFLINE")}
    du.download_url_to_file = refuse
    hub.download_url_to_file = refuse
    if weights_dir is not None:
        du.DEFAULT_CACHE_DIR = str(Path(weights_dir).expanduser().resolve())
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        du.download_url_to_file = saved["du_dl"]
        hub.download_url_to_file = saved["hub_dl"]
        du.DEFAULT_CACHE_DIR = saved["cache"]
        if saved["env"] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved["env"]


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
