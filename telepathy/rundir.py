"""The run folder: every path in it, its completion and preemption markers, and the preemption exit code.

Torch-free: the launcher, the node entry and the worker all use it. A folder that `launch` submits (one run,
or a sweep of runs) also holds the job record, submitit's files and the code snapshots:

    RUN/
      config.json  plan.json  manifest.json  metrics.jsonl  eval.json  predictions.jsonl  preempted.json
      failures/node<k>.json          why node k of a SLURM job failed (and workers<k>.json: torchrun's word)
      stopped/node<k>.json           node k's torchrun has exited after a preemption (this attempt's job, restarts)
      events.out.tfevents.*          TensorBoard (the run folder is its log dir)
      logs/worker_rank<r>.log
      checkpoints/step_<NNNNNN>/     bridge.safetensors  optimizer.pt  state.json  rng_rank<r>.pt  deepspeed/
                                     manifest.json (written last: the checkpoint is complete once it exists)
      jobs.json  slurm/  code/<n>/   (the folder `launch` submitted: a run, or a sweep holding task folders)
      recipe.json                    (a recipe's folder: its runs are task folders, or sweeps of them per layout)
      report/                        `launch report` output
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telepathy.errors import UserError
from telepathy.files import atomic_write_json, read_json

# Exit code of a worker that checkpointed after a preemption signal (EX_TEMPFAIL, "try again"), and of a
# node entry whose job asked to be requeued.
EXIT_PREEMPTED = 75
_STEP = re.compile(r"^step_(\d+)$")
_TMP = ".tmp_"  # a checkpoint folder's temporary twin: StepDir.tmp


@dataclass(frozen=True)
class StepDir:
    """One checkpoint folder: `checkpoints/step_NNNNNN/`."""

    path: Path

    @property
    def step(self) -> int:
        return int(_STEP.match(self.path.name).group(1))

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def bridge(self) -> Path:
        return self.path / "bridge.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.path / "optimizer.pt"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def deepspeed(self) -> Path:
        return self.path / "deepspeed"

    def rng(self, rank: int) -> Path:
        return self.path / f"rng_rank{rank}.pt"

    @property
    def tmp(self) -> Path:
        """Where the checkpoint is assembled before one rename publishes it."""
        return self.path.with_name(_TMP + self.path.name)


@dataclass(frozen=True)
class RunDir:
    """A run folder (or a submitted sweep folder) and every path inside it."""

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:  # a RunDir is path-like: Path(run_dir), open(), shutil accept it
        return str(self.path)

    # ---- what the launcher writes
    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def jobs(self) -> Path:
        return self.path / "jobs.json"

    @property
    def recipe(self) -> Path:
        """A recipe's run folder: the recipe as resolved and every run it planned (launch --recipe)."""
        return self.path / "recipe.json"

    @property
    def slurm(self) -> Path:
        """submitit's folder: submission scripts, pickles, one log per node."""
        return self.path / "slurm"

    @property
    def code(self) -> Path:
        """Code snapshots, one per submission: code/<n>/."""
        return self.path / "code"

    def next_code_snapshot(self) -> Path:
        """Where the code snapshot of the next submission goes: code/<n+1>."""
        existing = [int(p.name) for p in self.code.glob("*") if p.name.isdigit()]
        return self.code / str(max(existing, default=0) + 1)

    # ---- what the worker writes
    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def evaluation_failed(self) -> Path:
        """Rank 0's word to the ranks waiting for its evaluation that none is coming."""
        return self.path / "eval.failed"

    def mark_evaluation_failed(self) -> None:
        atomic_write_json(self.evaluation_failed, {})

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.jsonl"

    @property
    def preempted(self) -> Path:
        return self.path / "preempted.json"

    def sender_cache_job(self, index: int) -> RunDir:
        """A sweep's job that builds sender cache entry `index` before its array runs (a run folder of its own)."""
        return RunDir(self.path / "sender-cache" / str(index))

    @property
    def rendezvous(self) -> Path:
        """The multi-node rendezvous address of the current attempt, published by the job's first node."""
        return self.path / "rendezvous.json"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def node_failure(self, node: int) -> Path:
        """Why node `node` of the current SLURM attempt failed (launcher.node), for `launch status`."""
        return self.path / "failures" / f"node{node}.json"

    def node_failures(self) -> list[Path]:
        """Every node's failure record present (of whichever attempt wrote it)."""
        return sorted(self.path.glob("failures/node[0-9]*.json"), key=lambda p: p.name)

    def worker_failures(self, node: int) -> Path:
        """What that node's torchrun reported of its failed workers (ranks, exit codes, signals)."""
        return self.path / "failures" / f"workers{node}.json"

    def node_stopped(self, node: int) -> Path:
        """Written by node `node` once its torchrun has exited on a preemption: the first node requeues after all."""
        return self.path / "stopped" / f"node{node}.json"

    def fault_marker(self, name: str) -> Path:
        """An injected fault (telepathy.faults) that has fired in this run: it does not fire again."""
        return self.path / "faults" / name

    def worker_log(self, rank: int) -> Path:
        return self.logs / f"worker_rank{rank}.log"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def step(self, step: int) -> StepDir:
        return StepDir(self.checkpoints / f"step_{step:06d}")

    def step_dirs(self) -> list[StepDir]:
        """Every published checkpoint folder, newest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [StepDir(p) for p in self.checkpoints.iterdir() if p.is_dir() and _STEP.match(p.name)]
        return sorted(found, key=lambda s: s.step, reverse=True)

    def partial_step_dirs(self) -> list[Path]:
        """Temporary checkpoint folders (StepDir.tmp) that writes killed half-way left behind."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(
            p
            for p in self.checkpoints.iterdir()
            if p.is_dir() and _STEP.match(p.name.removeprefix(_TMP)) and p.name.startswith(_TMP)
        )

    @property
    def report(self) -> Path:
        return self.path / "report"

    # ---- markers
    def is_run(self) -> bool:
        return self.config.is_file()

    def is_complete(self) -> bool:
        """A run is complete once its evaluation file exists (the trainer writes it last, atomically)."""
        return self.eval.is_file()

    def mark_preempted(self, step: int) -> None:
        """Rank 0, once the preemption checkpoint is in place: what a node entry waits for before requeueing."""
        atomic_write_json(self.preempted, {"step": step})

    def preempted_step(self) -> int | None:
        """The step of this attempt's preemption checkpoint, None if there is none (or it is unreadable)."""
        try:
            record: dict[str, Any] | None = read_json(self.preempted, "preemption marker")
        except UserError:
            return None
        return record.get("step") if isinstance(record, dict) else None

    def clear_preempted(self) -> None:
        self.preempted.unlink(missing_ok=True)
