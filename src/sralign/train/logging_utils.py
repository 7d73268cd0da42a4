"""Metric logging: JSONL always, TensorBoard too when it is installed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank or damaged one (a kill mid-write)."""
    try:
        rec = json.loads(line)
        return int(rec["step"]) if isinstance(rec, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


class MetricLogger:
    """Appends ``{"step": s, **metrics}`` lines to ``metrics.jsonl`` in ``folder``.

    On resume, lines with step >= the resumed step are dropped first, so the file always equals
    an uninterrupted run's.
    """

    def __init__(self, folder: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [l for l in self.path.read_text(errors="replace").splitlines() if _step_of(l) is not None and _step_of(l) < resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(folder) / "tb"))
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None

    def log(self, step: int, **metrics: float) -> None:
        rec = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(folder: str | Path) -> list[dict]:
    p = Path(folder) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
