"""The job record of a submitted run or sweep (ROOT/jobs.json): created, selected and updated here only;
and what it shows: the state, progress, logs and cancellation of its tasks.

Every submission appends which SLURM job (or array task) runs which task; `status` asks SLURM about all of
them in ONE sacct call, whatever the number of tasks, and reads each task's progress (step, loss) from its
own run folder. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher import slurm
from launcher.runs import resolve, runs_root
from telepathy.errors import UserError
from telepathy.files import atomic_write_json, read_json, utc_now
from telepathy.rundir import RunDir

if TYPE_CHECKING:
    from launcher.plan import Plan

SCHEMA = 1


@dataclass
class TaskRecord:
    index: int
    name: str
    run_dir: str
    jobs: list[str] = field(default_factory=list)  # SLURM ids of its submissions, oldest first ("12" or "15_3")

    @property
    def job_id(self) -> str | None:
        return self.jobs[-1] if self.jobs else None

    @property
    def dir(self) -> RunDir:
        return RunDir(self.run_dir)


@dataclass
class JobRecord:
    root: str  # the run folder (one run) or the sweep folder
    kind: str  # "run" or "sweep"
    tasks: list[TaskRecord]
    submissions: list[dict[str, Any]] = field(default_factory=list)
    schema: int = SCHEMA

    # ------------------------------------------------------------------ create, load, save
    @classmethod
    def for_plans(cls, plans: Sequence[Plan], root: Path, kind: str) -> JobRecord:
        """The root's record: new, or from an earlier submission of the same run or sweep. A task folder that
        already holds a different configuration is an error: its checkpoints belong to that configuration."""
        for p in plans:
            saved = read_json(p.run.dir.config, "run config")
            if saved is not None and saved != json.loads(json.dumps(p.run.to_dict())):
                raise UserError(
                    f"{p.run.dir} already holds a run with another configuration; choose another --name "
                    "(or `launch resubmit` to continue that run)"
                )
        run_dirs = [str(Path(p.run.run_dir).absolute()) for p in plans]
        if not RunDir(root).jobs.exists():
            names = [Path(d).name if kind == "sweep" else p.run.name for d, p in zip(run_dirs, plans)]
            return cls(
                root=str(root), kind=kind, tasks=[TaskRecord(i, n, d) for i, (n, d) in enumerate(zip(names, run_dirs))]
            )
        record = cls.load(root)
        if record.kind != kind or [t.run_dir for t in record.tasks] != run_dirs:
            raise UserError(
                f"{root} already holds a different {record.kind} ({len(record.tasks)} task(s)); choose another --name"
            )
        return record

    @property
    def dir(self) -> RunDir:
        return RunDir(self.root)

    def save(self) -> None:
        atomic_write_json(self.dir.jobs, asdict(self))

    @classmethod
    def load(cls, root: str | Path) -> JobRecord:
        d = read_json(RunDir(root).jobs, "job record")
        if d is None:
            raise UserError(
                f"{root} holds no submitted SLURM jobs ({RunDir(root).jobs.name} missing); pass a run or "
                "sweep folder that `launch` submitted"
            )
        try:
            return cls(
                root=d["root"],
                kind=d["kind"],
                tasks=[TaskRecord(**t) for t in d["tasks"]],
                submissions=d.get("submissions", []),
                schema=d.get("schema", SCHEMA),
            )
        except (KeyError, TypeError, AttributeError) as e:  # valid JSON, not a job record (edited, truncated)
            raise UserError(
                f"job record {RunDir(root).jobs} is damaged ({type(e).__name__}: {e}); restore it from a backup, "
                "or remove the folder and submit again"
            ) from None

    # ------------------------------------------------------------------ select
    def select(self, indices: Sequence[int] | None) -> list[TaskRecord]:
        if indices is None:
            return list(self.tasks)
        known = {t.index: t for t in self.tasks}
        bad = [i for i in indices if i not in known]
        if bad:
            raise UserError(f"no task {bad[0]} in {self.root}; tasks are 0-{len(self.tasks) - 1}")
        return [known[i] for i in indices]

    def triage(self, indices: Sequence[int] | None = None) -> tuple[list[int], list[int], list[int]]:
        """(to submit, complete, still queued or running) among the given tasks; one SLURM query."""
        tasks = self.select(indices)
        complete = [t.index for t in tasks if t.dir.is_complete()]
        open_ = [t for t in tasks if t.index not in complete]
        states = slurm.job_states([t.job_id for t in open_ if t.job_id]).jobs
        active = [t.index for t in open_ if t.job_id and slurm.is_active(states.get(t.job_id, {}).get("State", ""))]
        todo = [t.index for t in open_ if t.index not in active]
        return todo, complete, active

    def last_submission(self, index: int) -> dict[str, Any] | None:
        return next((s for s in reversed(self.submissions) if index in s["tasks"]), None)

    # ------------------------------------------------------------------ update
    def record_submission(
        self,
        job_ids: dict[int, str],
        *,
        code_dir: Path,
        script: str,
        overrides: dict[str, Any] | None = None,
        after: list[dict[str, str]] | None = None,
    ) -> str:
        """Tasks -> the SLURM ids sbatch gave them (one job or array); saved at once. Returns the job's id.
        `after`: the jobs it waits for (afterok), e.g. {"job_id", "sender_cache": folder} for a cache build."""
        base = next(iter(job_ids.values())).split("_")[0]
        for index, jid in job_ids.items():
            self.tasks[index].jobs.append(jid)
        entry = {
            "job_id": base,
            "tasks": list(job_ids),
            "code_dir": str(code_dir),
            "submitted_at": utc_now(),
            "script": script,
        }
        if overrides:
            entry["overrides"] = overrides
        if after:
            entry["after"] = after
        self.submissions.append(entry)
        self.save()
        return base


def submitted_root(target: str, runs_dir: str | None) -> tuple[RunDir, list[int] | None]:
    """The submitted folder (holding the job record) a RUN_OR_SWEEP argument names, and the task indices
    it selects: None for all, or the one task when it names a task folder inside a sweep."""
    path = resolve(target, runs_dir)
    if RunDir(path).jobs.is_file():
        return RunDir(path), None
    parent = RunDir(path.parent)
    if parent.jobs.is_file():
        hits = [t.index for t in JobRecord.load(parent.path).tasks if Path(t.run_dir) == path]
        if hits:
            return parent, hits
    raise UserError(
        f"no submitted run or sweep at {target!r} (looked for {RunDir(path).jobs.name} there and under "
        f"{runs_root(runs_dir)}); pass the folder `launch` printed"
    )


# ---------------------------------------------------------------------------------------------- status


def last_train_record(run_dir: RunDir, tail_bytes: int = 65536) -> dict[str, Any] | None:
    """The newest training record of metrics.jsonl, reading only its end (status of big sweeps stays fast)."""
    try:
        with open(run_dir.metrics, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a partial first line of the tail, or a line being written
        if record.get("kind") == "train":
            return record
    return None


def _total_steps(run_dir: RunDir) -> int | None:
    try:
        return (read_json(run_dir.config) or {})["train"]["steps"]
    except (UserError, KeyError, TypeError):
        return None


def failure_reason(run_dir: RunDir, job_id: str | None) -> str | None:
    """Why job `job_id` of this task failed, as its node entries recorded it (launcher.node.record_failure):
    of its newest attempt, the likeliest cause (torchrun killed, then a worker killed by a signal, then an
    exit: a rank whose peer died exits after it), the earliest among equals. None when no node recorded one."""
    found = []
    for path in run_dir.node_failures():
        try:
            d = read_json(path, "node failure")
        except UserError:
            continue  # half-readable folder: status still shows the rest
        if isinstance(d, dict) and d.get("job_id") == job_id and "reason" in d:
            found.append(d)
    if not found:
        return None
    newest = max(d["restarts"] for d in found)
    d = min((d for d in found if d["restarts"] == newest), key=lambda d: (d["cause"], d["at"]))
    return d["reason"]


def task_status(record: JobRecord, indices: list[int] | None = None) -> list[dict[str, Any]]:
    """One row per task (stable keys: the `--json` schema of `launch status`)."""
    tasks = record.select(indices)
    states = slurm.job_states([t.job_id for t in tasks if t.job_id])
    rows = []
    for t in tasks:
        s = states.jobs.get(t.job_id or "", {})
        last = last_train_record(t.dir) or {}
        rows.append(
            {
                "index": t.index,
                "name": t.name,
                "run_dir": t.run_dir,
                "job_id": t.job_id,
                "state": s.get("State", "UNKNOWN" if t.job_id else "NOT_SUBMITTED"),
                "nodes": s.get("NodeList"),
                "reason": s.get("Reason") if s.get("State") == "PENDING" else None,
                "exit_code": s.get("ExitCode"),
                "elapsed_s": slurm.elapsed_seconds(s.get("Elapsed")),
                "attempts": s.get("attempts", 0),
                "submissions": len(t.jobs),
                "step": last.get("step"),
                "steps": _total_steps(t.dir),
                "loss": last.get("loss"),
                "complete": t.dir.is_complete(),
                "checkpoint_on_preemption": t.dir.preempted_step(),
                # a cancelled job's workers exit too, but that is no failure to explain
                "failure": None
                if slurm.is_active(state := s.get("State", "")) or state.startswith("CANCELLED")
                else failure_reason(t.dir, t.job_id),
            }
        )
    return rows


def format_status(record: JobRecord, rows: list[dict[str, Any]]) -> str:
    head = f"{record.kind} {record.root}: {len(rows)} task(s)"
    cols = ("TASK", "NAME", "JOB", "STATE", "NODES", "STEP", "LOSS", "ELAPSED", "ATTEMPTS")
    table = [cols]
    for r in rows:
        step = "-" if r["step"] is None else f"{r['step']}/{r['steps'] or '?'}"
        state = r["state"] + (" (done)" if r["complete"] and r["state"] != "COMPLETED" else "")
        if r.get("reason"):
            state += f" ({r['reason']})"
        el = r["elapsed_s"]
        table.append(
            (
                str(r["index"]),
                r["name"],
                r["job_id"] or "-",
                state,
                r["nodes"] or "-",
                step,
                "-" if r["loss"] is None else f"{r['loss']:.4f}",
                "-" if el is None else f"{el // 60}m{el % 60:02d}s",
                str(r["attempts"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines += [f"task {r['index']} failed: {r['failure']}" for r in rows if r.get("failure") and not r["complete"]]
    return "\n".join([head, *lines])


# ---------------------------------------------------------------------------------------------- logs, cancel


def log_path(record: JobRecord, task: TaskRecord, node: int = 0) -> Path | None:
    """The node's log of the task's newest submission (stdout and stderr together), by submitit's naming."""
    from submitit.core.utils import JobPaths  # noqa: PLC0415  (submitit only for `launch logs`)

    if task.job_id is None:
        return None
    return JobPaths(record.dir.slurm, job_id=task.job_id, task_id=node).stdout


def cancel(record: JobRecord, indices: list[int] | None = None) -> list[str]:
    """scancel every still-active task, in one call; returns the ids cancelled."""
    tasks = [t for t in record.select(indices) if t.job_id]
    states = slurm.job_states([t.job_id for t in tasks]).jobs
    ids = [t.job_id for t in tasks if slurm.is_active(states.get(t.job_id, {}).get("State", "UNKNOWN"))]
    slurm.scancel(ids)
    return ids
