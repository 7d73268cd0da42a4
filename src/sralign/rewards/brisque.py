"""BRISQUE (Mittal et al., 2012) with the published SVR model shipped by the ``brisque`` package.

Features are computed in torch, batched (``nss.two_scale_features``); the score is the package's
RBF ε-SVR evaluated directly from its ``svm.txt`` (no libsvm call, no OpenCV). The feature
scaling parameters are read from the package's ``normalize.pickle`` with an unpickler that only
admits plain dicts, lists and numbers. Lower is better (typical range 0–100).
"""

from __future__ import annotations

import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from .nss import rgb_to_gray, two_scale_features


class MissingModelError(FileNotFoundError):
    pass


def brisque_model_dir() -> Path:
    spec = importlib.util.find_spec("brisque")
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(
            "BRISQUE needs the model files shipped by the 'brisque' package (models/svm.txt, "
            "models/normalize.pickle); install it with `pip install brisque`"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "models"
    for f in ("svm.txt", "normalize.pickle"):
        if not (d / f).is_file():
            raise MissingModelError(f"BRISQUE model file {f} not found in {d}; reinstall the 'brisque' package")
    return d


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # only builtin containers are allowed
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a parameter file")


@lru_cache(maxsize=1)
def load_brisque_model() -> dict[str, Tensor | float]:
    d = brisque_model_dir()
    with open(d / "normalize.pickle", "rb") as f:
        norm = _PlainUnpickler(f).load()
    lines = (d / "svm.txt").read_text().splitlines()
    header = {}
    i = 0
    while lines[i].strip() != "SV":
        k, *v = lines[i].split()
        header[k] = v
        i += 1
    coefs, svs = [], []
    for line in lines[i + 1 :]:
        if not line.strip():
            continue
        parts = line.split()
        coefs.append(float(parts[0]))
        vec = [0.0] * 36
        for kv in parts[1:]:
            k, v = kv.split(":")
            vec[int(k) - 1] = float(v)
        svs.append(vec)
    return {
        "min": torch.tensor(norm["min_"], dtype=torch.float64),
        "max": torch.tensor(norm["max_"], dtype=torch.float64),
        "gamma": float(header["gamma"][0]),
        "rho": float(header["rho"][0]),
        "coef": torch.tensor(coefs, dtype=torch.float64),
        "sv": torch.tensor(svs, dtype=torch.float64),
    }


def brisque_score(x: Tensor) -> Tensor:
    """BRISQUE of [B,3,H,W] in [0,1] -> [B] (lower is better)."""
    m = load_brisque_model()
    f = two_scale_features(rgb_to_gray(x.double()))
    scaled = -1 + 2.0 / (m["max"] - m["min"]) * (f - m["min"])
    d2 = torch.cdist(scaled, m["sv"]) ** 2
    return (torch.exp(-m["gamma"] * d2) @ m["coef"] - m["rho"]).to(x.dtype)
