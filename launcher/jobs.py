"""The jobs of a run or sweep: their record (ROOT/jobs.json) and their state, logs and cancellation.

Every submission appends to the record which SLURM job (or array task) runs which task; `status`
asks SLURM about all of them in ONE sacct call, whatever the number of tasks, and reads each task's
progress (step, loss) from its own run folder. Torch-free.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from telepathy.config import atomic_write_text
from telepathy.errors import UserError

JOBS_FILE = "jobs.json"
SCHEMA = 1
SLURM_DIR = "slurm"  # submitit's folder under the root: submission scripts, pickles, one log per node
# States in which a job may still run: a task in one of them is not submitted again.
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}
SACCT_FIELDS = ("JobID", "State", "NodeList", "Elapsed", "ExitCode")


@dataclass
class TaskRecord:
    index: int
    name: str
    run_dir: str
    jobs: list[str] = field(default_factory=list)  # SLURM ids of its submissions, oldest first ("12" or "15_3")

    @property
    def job_id(self) -> str | None:
        return self.jobs[-1] if self.jobs else None


@dataclass
class JobRecord:
    root: str  # the run folder (one run) or the sweep folder
    kind: str  # "run" or "sweep"
    tasks: list[TaskRecord]
    submissions: list[dict[str, Any]] = field(default_factory=list)
    schema: int = SCHEMA

    @property
    def path(self) -> Path:
        return Path(self.root) / JOBS_FILE

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, root: str | Path) -> "JobRecord":
        path = Path(root) / JOBS_FILE
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{root} holds no submitted SLURM jobs ({JOBS_FILE} missing); pass a run or sweep folder "
                            "that `launch` submitted") from None
        return cls(root=d["root"], kind=d["kind"], tasks=[TaskRecord(**t) for t in d["tasks"]],
                   submissions=d.get("submissions", []), schema=d.get("schema", SCHEMA))

    def select(self, indices: list[int] | None) -> list[TaskRecord]:
        if indices is None:
            return list(self.tasks)
        known = {t.index: t for t in self.tasks}
        bad = [i for i in indices if i not in known]
        if bad:
            raise UserError(f"no task {bad[0]} in {self.root}; tasks are 0-{len(self.tasks) - 1}")
        return [known[i] for i in indices]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def find_root(target: str, runs_dir: str | None = None) -> tuple[Path, list[int] | None]:
    """A run folder, a sweep folder, one task's folder inside a sweep, or a name under the runs folder
    -> (folder holding jobs.json, the task indices it selects or None for all)."""
    from launcher.rundir import runs_root  # noqa: PLC0415

    for cand in (Path(target).expanduser(), runs_root(runs_dir) / target):
        cand = cand.absolute()
        if (cand / JOBS_FILE).is_file():
            return cand, None
        if (cand.parent / JOBS_FILE).is_file():  # a task inside a sweep
            record = JobRecord.load(cand.parent)
            hits = [t.index for t in record.tasks if Path(t.run_dir) == cand]
            if hits:
                return cand.parent, hits
    raise UserError(f"no submitted run or sweep at {target!r} (looked for {JOBS_FILE} there and under "
                    f"{runs_root(runs_dir)}); pass the folder `launch` printed")


# ------------------------------------------------------------------------------------------ SLURM state

_ARRAY = re.compile(r"^(\d+)_\[([0-9,\-]+)(?:%\d+)?\]$")


def _expand_job_id(job_id: str) -> list[str]:
    """sacct's ids: '12', '15_3', or a pending array range '15_[4-6,9%2]' -> ['15_4', '15_5', '15_6', '15_9']."""
    m = _ARRAY.match(job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found: run this where the SLURM client tools are installed") from None
    except subprocess.CalledProcessError as e:
        why = e.stderr.strip() or e.returncode
        raise UserError(f"{cmd[0]} failed ({why}); is SLURM (and its accounting) up?") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{cmd[0]} did not answer within 60 s; the controller or its database may be down, "
                        "try again") from None


def sacct(job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """SLURM's view of any number of jobs and array tasks in one sacct call -> {job id: {State, NodeList,
    Elapsed, ExitCode, attempts}}. With --duplicates every attempt of a requeued job is a row (the newest
    wins). Jobs the accounting database has not received yet (seconds after sbatch) come from one squeue call."""
    wanted = set(job_ids)
    base = sorted({j.split("_")[0] for j in wanted}, key=int)
    if not base:
        return {}
    out = _run(["sacct", "--allocations", "--duplicates", "--parsable2", "--noheader",
                f"--format={','.join(SACCT_FIELDS)}", f"--jobs={','.join(base)}"])
    states: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        row = dict(zip(SACCT_FIELDS, line.split("|")))
        if len(row) != len(SACCT_FIELDS):
            continue
        row["State"] = row["State"].split()[0] if row["State"] else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
        if row["NodeList"] in ("", "None assigned"):
            row["NodeList"] = None
        for jid in _expand_job_id(row.pop("JobID")):
            attempts = states.get(jid, {}).get("attempts", 0) + 1
            states[jid] = {**row, "attempts": attempts}
    for jid in wanted - set(states):  # an array cancelled before any task started is one row: "15"
        if "_" in jid and jid.split("_")[0] in states:
            states[jid] = states[jid.split("_")[0]]
    missing = sorted({j.split("_")[0] for j in wanted - set(states)}, key=int)
    if missing:
        try:
            out = _run(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N|%M",
                        f"--jobs={','.join(missing)}"])
        except UserError:  # squeue refuses ids the controller has forgotten: those stay UNKNOWN
            out = ""
        for line in out.splitlines():
            jid, state, nodes, elapsed = (line.split("|") + ["", "", "", ""])[:4]
            states.setdefault(jid.strip(), {"State": state, "NodeList": nodes or None, "Elapsed": elapsed,
                                            "ExitCode": None, "attempts": 1})
    return states


def elapsed_seconds(text: str) -> int | None:
    """sacct's [D-]HH:MM:SS or squeue's [[D-]H:]M:SS -> seconds."""
    m = re.match(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$", text or "")
    if not m:
        return None
    d, h, mi, s = (int(x or 0) for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


# ------------------------------------------------------------------------------------------ task status


def last_train_record(run_dir: str | Path, tail_bytes: int = 65536) -> dict[str, Any] | None:
    """The newest training record of metrics.jsonl, reading only its end (status of big sweeps stays fast)."""
    from telepathy.metrics import METRICS_FILE  # noqa: PLC0415

    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, "rb") as f:
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


def _total_steps(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / "config.json").read_text())["train"]["steps"]
    except (OSError, ValueError, KeyError):
        return None


def task_status(record: JobRecord, indices: list[int] | None = None) -> list[dict[str, Any]]:
    """One row per task (stable keys: the `--json` schema of `launch status`)."""
    from launcher.sweep import is_complete  # noqa: PLC0415
    from telepathy.train import PREEMPTED_FILE  # noqa: PLC0415

    tasks = record.select(indices)
    states = sacct([t.job_id for t in tasks if t.job_id])
    rows = []
    for t in tasks:
        run_dir = Path(t.run_dir)
        s = states.get(t.job_id or "", {})
        last = last_train_record(run_dir) or {}
        preempted = None
        try:
            preempted = json.loads((run_dir / PREEMPTED_FILE).read_text()).get("step")
        except (OSError, ValueError):
            pass
        rows.append({
            "index": t.index, "name": t.name, "run_dir": t.run_dir, "job_id": t.job_id,
            "state": s.get("State", "UNKNOWN" if t.job_id else "NOT_SUBMITTED"), "nodes": s.get("NodeList") or None,
            "exit_code": s.get("ExitCode"), "elapsed_s": elapsed_seconds(s.get("Elapsed", "")),
            "attempts": s.get("attempts", 0), "submissions": len(t.jobs),
            "step": last.get("step"), "steps": _total_steps(run_dir), "loss": last.get("loss"),
            "complete": is_complete(run_dir), "checkpoint_on_preemption": preempted,
        })
    return rows


def is_active(state: str) -> bool:
    return state in ACTIVE


def format_status(record: JobRecord, rows: list[dict[str, Any]]) -> str:
    head = f"{record.kind} {record.root}: {len(rows)} task(s)"
    cols = ("TASK", "NAME", "JOB", "STATE", "NODES", "STEP", "LOSS", "ELAPSED", "ATTEMPTS")
    table = [cols]
    for r in rows:
        step = "-" if r["step"] is None else f"{r['step']}/{r['steps'] or '?'}"
        state = r["state"] + (" (done)" if r["complete"] and r["state"] != "COMPLETED" else "")
        el = r["elapsed_s"]
        table.append((str(r["index"]), r["name"], r["job_id"] or "-", state, r["nodes"] or "-", step,
                      "-" if r["loss"] is None else f"{r['loss']:.4f}",
                      "-" if el is None else f"{el // 60}m{el % 60:02d}s", str(r["attempts"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join([head, *lines])


# ------------------------------------------------------------------------------------------ logs, cancel


def log_path(record: JobRecord, task: TaskRecord, node: int = 0) -> Path | None:
    """The node's log of the task's newest submission (stdout and stderr together), by submitit's naming."""
    from submitit.core.utils import JobPaths  # noqa: PLC0415

    if task.job_id is None:
        return None
    return JobPaths(Path(record.root) / SLURM_DIR, job_id=task.job_id, task_id=node).stdout


def cancel(record: JobRecord, indices: list[int] | None = None) -> list[str]:
    """scancel every still-active task, in one call; returns the ids cancelled."""
    tasks = [t for t in record.select(indices) if t.job_id]
    states = sacct([t.job_id for t in tasks])
    ids = [t.job_id for t in tasks if is_active(states.get(t.job_id, {}).get("State", "UNKNOWN"))]
    if ids:
        subprocess.run(["scancel", *ids], check=True, timeout=60, capture_output=True)
    return ids
