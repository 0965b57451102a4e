"""Fault injection for the reliability tests: kill a worker at a named point, once per run folder.

`TELEPATHY_FAULT` holds comma-separated faults `POINT@STEP` or `POINT@STEP:RANK` (rank 0 when omitted):

- `step`: SIGKILL during optimizer step STEP, after its micro-steps and before the update;
- `checkpoint-bridge`: while checkpoint STEP's bridge file is half written (the file is cut to half);
- `checkpoint-manifest`: every file of checkpoint STEP written, its manifest not;
- `checkpoint-rename`: the manifest written, the folder not yet renamed into place.

Each fault fires once per run folder: a marker (RunDir.fault_marker) is written and fsynced before the
kill, so the restarted group, the requeued job or `launch resubmit` continues past it, as after a real
crash. Unset (the normal case) it costs one dictionary lookup per call. Torch-free.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from functools import cache

from telepathy.errors import UserError
from telepathy.rundir import RunDir

ENV = "TELEPATHY_FAULT"
POINTS = ("step", "checkpoint-bridge", "checkpoint-manifest", "checkpoint-rename")


@dataclass(frozen=True)
class Fault:
    point: str
    step: int
    rank: int = 0

    @property
    def name(self) -> str:
        return f"{self.point}@{self.step}:{self.rank}"


def parse(text: str) -> tuple[Fault, ...]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if point not in POINTS or not step.isdigit() or (rank and not rank.isdigit()):
            raise UserError(f"{ENV}: {item!r} is not POINT@STEP[:RANK] with POINT one of {', '.join(POINTS)}")
        faults.append(Fault(point, int(step), int(rank or 0)))
    return tuple(faults)


@cache
def _armed() -> tuple[Fault, ...]:
    return parse(os.environ.get(ENV, ""))


def due(point: str, step: int, rank: int, run_dir: RunDir) -> bool:
    """Whether a fault is armed here and has not fired in this run folder yet."""
    return any(
        f.point == point and f.step == step and f.rank == rank and not run_dir.fault_marker(f.name).exists()
        for f in _armed()
    )


def kill(point: str, step: int, rank: int, run_dir: RunDir) -> None:
    """SIGKILL this process if a fault is due here (recording first that it fired)."""
    if not due(point, step, rank, run_dir):
        return
    marker = run_dir.fault_marker(Fault(point, step, rank).name)
    marker.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644)
    os.fsync(fd)
    os.close(fd)
    print(f"[telepathy fault] rank {rank}: SIGKILL at {point} of step {step} ({ENV})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
