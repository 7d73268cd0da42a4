"""Atomic training checkpoints: model, optimiser, EMA, RNG states, step — safetensors + JSON."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import to_dict


class CheckpointError(ValueError):
    """A run folder that cannot be resumed (corrupt checkpoint, another method or config);
    the message names the file and the fix."""


# What ``--resume`` may change: the step budget and the checkpoint / log cadence. Everything
# else (method, β, lr, data, seeds, metrics, ...) shapes the run and must match the original.
RESUME_MAY_CHANGE = frozenset({"steps", "steps_total", "checkpoint_every", "log_every", "eval_every", "overlap_rollouts"})


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(out: str | Path, cfg: Any) -> None:
    """Before ``--resume`` continues the run in ``out``: the run's ``config.yaml`` must name the
    same method and the same config as ``cfg`` (only ``RESUME_MAY_CHANGE`` keys may differ).
    No checkpoint, nothing to check. Raises ``CheckpointError`` naming both values."""
    out = Path(out)
    if not has_checkpoint(out / "checkpoint"):
        return
    f = out / "config.yaml"
    if not f.is_file():
        raise CheckpointError(f"--resume: {f} is missing, so the run's config cannot be checked; "
                              f"restore it, or start a new run in another --out")
    try:
        saved = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--resume: {f} is corrupt ({str(e).splitlines()[0]}); restore it, or start a new run in another --out") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume: {f} is corrupt (not a mapping of keys to values); restore it, or start a new run in another --out")
    def as_saved(c: Any) -> dict[str, Any]:  # compare as the file holds it
        return yaml.safe_load(yaml.safe_dump(to_dict(c), sort_keys=False))

    new = as_saved(cfg)
    m_old, m_new = saved.get("method"), new.get("method")
    if m_old != m_new:
        raise CheckpointError(f"--resume: {out} is a {m_old or 'pretrain'} run, not {m_new or 'pretrain'}; "
                              f"resume it with --method {m_old}, or start the {m_new} run in another --out")
    # a key the run's file lacks (a run made before the field existed) had the field's default
    a, b = {**_flat(as_saved(type(cfg)())), **_flat(saved)}, _flat(new)
    diff = [k for k in sorted(set(a) | set(b)) if k not in RESUME_MAY_CHANGE and a.get(k, "<unset>") != b.get(k, "<unset>")]
    if diff:
        shown = "; ".join(f"{k}: run has {a.get(k, '<unset>')!r}, now {b.get(k, '<unset>')!r}" for k in diff[:3])
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        raise CheckpointError(f"--resume: config differs from the run's {f}: {shown}{more}; resume with the run's "
                              f"values (only {', '.join(sorted(RESUME_MAY_CHANGE))} may change) or start a new run in another --out")
    check_checkpoint_files(out / "checkpoint")


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


def _fix(folder: Path) -> str:
    return f"restore it, or delete {folder} to start the run over"


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "rng" not in meta:
            raise ValueError("step or rng state missing")
    except (ValueError, UnicodeDecodeError, OSError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{folder / 'state.json'} is corrupt ({e}); {_fix(folder)}") from None
    return meta


def check_checkpoint_files(folder: str | Path) -> int:
    """Cheap integrity check of a checkpoint (``state.json`` parses, the safetensors header
    reads) before anything is rewritten; returns its step. ``CheckpointError`` naming the file."""
    folder = Path(folder)
    meta = _read_meta(folder)
    try:
        with safe_open(str(folder / "state.safetensors"), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / 'state.safetensors'} is missing or corrupt ({e}); {_fix(folder)}") from None
    return meta["step"]


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
    fix = _fix(folder)
    meta = _read_meta(folder)
    try:
        tensors = load_file(str(folder / "state.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / 'state.safetensors'} is missing or corrupt ({e}); {fix}") from None
    try:
        for name, m in modules.items():
            pre = name + "."
            sd = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
            if isinstance(m, torch.nn.Module):
                m.load_state_dict(sd)
            else:
                missing = sorted(set(m) - set(sd))
                if missing:
                    raise CheckpointError(f"{folder}: checkpoint lacks {name}.{missing[0]} (and {len(missing) - 1} more); "
                                          "it was written for another model or configuration")
                with torch.no_grad():
                    for k in m:
                        m[k].copy_(sd[k])
        if optimizer is not None and "optimizer" in meta:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        set_rng_state(meta["rng"])
        for k, g in (generators or {}).items():
            g.set_state(torch.tensor(meta["generators"][k], dtype=torch.uint8))
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: checkpoint does not fit this model or is damaged ({first}); "
                              f"resume with the run's --policy and config, or {fix}") from None
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
    try:
        d = json.loads(f.read_text())
        if d["step"] != step:
            return False
    except (ValueError, KeyError, TypeError):  # a damaged per-rank file: rank 0's states stay
        return False
    for k, g in generators.items():
        g.set_state(torch.tensor(d["generators"][k], dtype=torch.uint8))
    return True


def has_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / "state.json").is_file()
