"""TensorBoard event files beside `RUN/metrics.jsonl`, so `tensorboard --logdir RUNS` shows every run.

A sink of the metrics writer (rank 0): every numeric field of a metrics record becomes a scalar tagged
`<kind>/<field>` at the record's step (nested dicts flatten to `<kind>/<a>/<b>`). Optional: without the
tensorboard package it says so once and the run goes on; metrics.jsonl stays the record of truth.
(Named tb.py, not tensorboard.py, so it never shadows the tensorboard package.)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_warned = False


def scalars(record: dict[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite number in the record; bools, strings and the step itself are skipped."""
    for key, value in record.items():
        if key in ("step", "kind", "time"):
            continue
        tag = f"{prefix}/{key}"
        if isinstance(value, dict):
            yield from scalars(value, tag)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield tag, float(value)


class TensorBoardSink:
    """Writes metrics records as TensorBoard scalars into `run_dir`; a no-op when disabled or unavailable."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, purge_step: int | None = None):
        self._writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  (optional: TensorBoard off when it is missing)
        except ImportError as e:  # tensorboard is an ordinary dependency, but a run must not die for a plot
            global _warned
            if not _warned:
                print(f"note: TensorBoard logging off ({e}); the metrics file is still written", file=sys.stderr)
                _warned = True
            return
        self._writer = SummaryWriter(log_dir=str(run_dir), flush_secs=30, purge_step=purge_step)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None or not isinstance(record.get("step"), int):
            return
        for tag, value in scalars(record, str(record.get("kind", "train"))):
            self._writer.add_scalar(tag, value, record["step"])

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
