"""Training metrics (rank 0): one JSON line per record in the run's metrics file, and a progress display.

Every record goes through `MetricsWriter.write`, the single place to add another sink (e.g. TensorBoard).
The progress display is a live bar with rate and ETA on a terminal and plain periodic lines otherwise
(SLURM logs, pipes), where a redrawn bar would be noise.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from telepathy.rundir import RunDir


class MetricsWriter:
    """Appends records to the metrics file; a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | Path | RunDir, enabled: bool = True, resumed_at: int = 0):
        from telepathy.tb import TensorBoardSink  # noqa: PLC0415  (tensorboard only where metrics are written)

        run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.path = run_dir.metrics
        self._f: TextIO | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", buffering=1)  # line-buffered: a killed job keeps every full line
        # After a requeue, TensorBoard drops the steps logged after the checkpoint (they are redone).
        self._tensorboard = TensorBoardSink(
            run_dir.path, enabled=enabled, purge_step=resumed_at + 1 if resumed_at else None
        )

    def write(self, record: dict[str, Any]) -> None:
        """One record (with "kind" and "step") to every sink."""
        if self._f is not None:
            self._f.write(json.dumps(record, default=_jsonable) + "\n")
            self._tensorboard.write(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._tensorboard.close()


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):  # tensors and numpy scalars
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} to the metrics file")


def read_metrics(run_dir: str | Path | RunDir) -> list[dict[str, Any]]:
    path = (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).metrics
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: every full line before it still counts
            continue
    return records


def _percent(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def method_results(ev: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{method: {"accuracy": %, "scored_accuracy": %, "latency_ms": median ms or None, "unmatched": n}} for
    every method of an evaluation (telepathy/evaluate.py: accuracies as fractions, None where a method does
    not generate, latency per method)."""
    out: dict[str, dict[str, Any]] = {}
    for name, r in ev.get("methods", {}).items():
        lat = ev.get("latency_ms", {}).get(name)
        out[name] = {
            "accuracy": _percent(r["accuracy"]),
            "scored_accuracy": _percent(r.get("scored_accuracy")),
            "latency_ms": lat["median"] if lat else None,
            "unmatched": r.get("unmatched"),
        }
    return out


def eval_record(ev: dict[str, Any], step: int) -> dict[str, Any]:
    """The metrics record of an evaluation (accuracies %, latency ms per method): written after the
    evaluation file, so TensorBoard shows it beside the training curves."""
    res = method_results(ev)
    return {
        "kind": "eval",
        "step": step,
        **{
            key: {m: r[key] for m, r in res.items() if r[key] is not None}
            for key in ("accuracy", "scored_accuracy", "latency_ms")
        },
    }


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Shows done/total, rate and ETA for any long local work (training steps, evaluated samples, cached
    examples). On a terminal a live bar; otherwise a plain line each time another `every` units are done."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        every: int = 10,
        enabled: bool = True,
        stream: TextIO | None = None,
        label: str = "step",
        unit: str = "step",
    ):
        self.total, self.start, self.every, self.enabled = total, start, max(1, every), enabled
        self.label, self.unit = label, unit
        self.stream = stream or sys.stderr
        self._t0 = time.monotonic()
        self._printed = start
        self._bar: Any = None
        if enabled and self.stream.isatty():
            from rich.console import Console  # noqa: PLC0415  (rich only on a terminal)
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: PLC0415  (rich only on a terminal)
            from rich.progress import Progress as RichProgress  # noqa: PLC0415  (rich only on a terminal)

            self._bar = RichProgress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._task = self._bar.add_task(label, total=total, completed=start, info="", rate="")
            self._bar.start()

    def _rate(self, done: int) -> float:
        return (done - self.start) / max(time.monotonic() - self._t0, 1e-9)

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        rate = self._rate(done)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info, rate=f"{rate:.2f} {self.unit}s/s")
        elif done // self.every > self._printed // self.every or done == self.total:
            self._printed = done
            eta = (self.total - done) / rate if rate > 0 else math.inf
            print(
                f"{self.label} {done}/{self.total} {info} | {rate:.2f} {self.unit}s/s, eta {format_duration(eta)}",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
