"""Atomic training checkpoints: model, optimiser, EMA, RNG states, step — safetensors + JSON."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta_state = {}
    for pid, st in sd["state"].items():
        meta_state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                meta_state[str(pid)][k] = "__tensor__"
            else:
                meta_state[str(pid)][k] = v
    return tensors, {"state": meta_state, "param_groups": sd["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"opt.{pid}.{k}"] if v == "__tensor__" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_training_state(
    folder: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Write ``folder/state.safetensors`` and ``folder/state.json`` atomically (json last: a
    checkpoint exists only once its json does)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        sd = m.state_dict() if isinstance(m, torch.nn.Module) else m
        for k, v in sd.items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
    meta: dict[str, Any] = {"step": step, "modules": list(modules), "extra": extra or {}, "rng": rng_state()}
    if optimizer is not None:
        ot, om = _flatten_optimizer(optimizer)
        tensors.update(ot)
        meta["optimizer"] = om
    if generators:
        meta["generators"] = {k: g.get_state().tolist() for k, g in generators.items()}
    tmp = folder / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "state.safetensors")
    tmpj = folder / "state.json.tmp"
    tmpj.write_text(json.dumps(meta))
    os.replace(tmpj, folder / "state.json")
    return folder


def load_training_state(
    folder: str | Path,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
    generators: dict[str, torch.Generator] | None = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore what ``save_training_state`` wrote; returns the meta dict (``step``, ``extra``).
    ``generators`` come from this ``rank``'s own file when it matches the checkpoint's step
    (``save_rank_generators``), else from ``state.json`` (rank 0's)."""
    folder = Path(folder)
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    for name, m in modules.items():
        pre = name + "."
        sd = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
        if isinstance(m, torch.nn.Module):
            m.load_state_dict(sd)
        else:
            missing = sorted(set(m) - set(sd))
            if missing:
                raise KeyError(f"{folder}: checkpoint lacks {name}.{missing[0]} (and {len(missing) - 1} more); "
                               "it was written for another model or configuration")
            with torch.no_grad():
                for k in m:
                    m[k].copy_(sd[k])
    if optimizer is not None and "optimizer" in meta:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    set_rng_state(meta["rng"])
    for k, g in (generators or {}).items():
        g.set_state(torch.tensor(meta["generators"][k], dtype=torch.uint8))
    if generators:
        load_rank_generators(folder, meta["step"], rank, generators)
    return meta


def save_rank_generators(folder: str | Path, step: int, rank: int, generators: dict[str, torch.Generator]) -> None:
    """Each rank's own generator states (ranks draw different data): ``generators.rank<r>.json``,
    tagged with the step, written atomically before the checkpoint's json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"generators.rank{rank}.json.tmp"
    tmp.write_text(json.dumps({"step": step, "generators": {k: g.get_state().tolist() for k, g in generators.items()}}))
    os.replace(tmp, folder / f"generators.rank{rank}.json")


def load_rank_generators(folder: str | Path, step: int, rank: int, generators: dict[str, torch.Generator]) -> bool:
    """Restore this rank's generators if its file matches the checkpoint's step; False otherwise
    (then the states in ``state.json``, rank 0's, stay)."""
    f = Path(folder) / f"generators.rank{rank}.json"
    if not f.is_file():
        return False
    d = json.loads(f.read_text())
    if d["step"] != step:
        return False
    for k, g in generators.items():
        g.set_state(torch.tensor(d["generators"][k], dtype=torch.uint8))
    return True


def has_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / "state.json").is_file()
