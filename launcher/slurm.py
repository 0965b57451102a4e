"""SLURM's view of jobs: sacct, squeue and scontrol, called with fixed formats and parsed in one place.

Every query asks for `--parsable2` (fields split by '|', no trailing '|') with an explicit field list, so
the parse does not depend on a SLURM version's default columns. squeue and sinfo have no --parsable2:
they get a '|'-separated --format of their own. A line that does not parse is reported (`Parsed.problems`,
and a warning on the `launcher.slurm` logger, which `launch` prints as `warning: ...`), never a traceback.
Recorded outputs of SLURM 22.05, 23.11 and 24.11 (tests/data/slurm/) pin what the parsers accept.
Torch-free.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from telepathy.errors import UserError

log = logging.getLogger(__name__)

# States in which a job may still run: a task in one of them is not submitted again.
ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
    "STOPPED",
    "SPECIAL_EXIT",  # held after a chosen exit code, like REQUEUE_HOLD: released, it runs again
}
SACCT_FIELDS = ("JobID", "State", "NodeList", "Elapsed", "ExitCode", "Reason")
# squeue's format codes for the same facts: id (%i: ARRAYJOB_TASK for array tasks), state, nodes, elapsed, reason.
SQUEUE_FORMAT = "%i|%T|%N|%M|%r"
SQUEUE_FIELDS = ("JobID", "State", "NodeList", "Elapsed", "Reason")
_ARRAY = re.compile(r"^(\d+)_\[([0-9,\-]+)(?:%\d+)?\]$")
# JobID as sacct and squeue print it: 12, an array task 15_3, an array's pending rest 15_[4-6%2], a
# heterogeneous job's component 20+1, each optionally with a step (.batch, .extern, .interactive, .0, .0+1).
_JOB_ID = re.compile(
    r"^(?P<job>\d+(?:_(?:\d+|\[[0-9,\-]+(?:%\d+)?\]))?)(?:\+(?P<het>\d+))?"
    r"(?P<step>\.(?:batch|extern|interactive|\d+)(?:\+\d+)?)?$"
)


def is_active(state: str) -> bool:
    return state in ACTIVE


def expand_job_id(job_id: str) -> list[str]:
    """SLURM's ids: '12', '15_3', or a pending array range '15_[4-6,9%2]' -> ['15_4', '15_5', '15_6', '15_9']."""
    m = _ARRAY.match(job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def elapsed_seconds(text: str | None) -> int | None:
    """sacct's [D-]HH:MM:SS or squeue's [[D-]H:]M:SS -> seconds (None for "", "INVALID", anything else)."""
    m = re.match(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$", text or "")
    if not m:
        return None
    d, h, mi, s = (int(x or 0) for x in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


@dataclass
class Parsed:
    """{job id: {State, NodeList, Elapsed, ExitCode, Reason, attempts}} and the lines that did not parse."""

    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    # "CANCELLED by 1000" -> CANCELLED; a state cut to its column width ends in "+" ("CANCELLED+")
    state = (row.get("State") or "").split()
    row["State"] = state[0].rstrip("+") if state else "UNKNOWN"
    if row.get("NodeList") in ("", "None assigned", "(null)", "None", None):
        row["NodeList"] = None
    reason = row.get("Reason")
    row["Reason"] = None if reason in ("", "None", "(null)", None) else reason
    if "ExitCode" in row and not row["ExitCode"]:
        row["ExitCode"] = None
    return row


def _rows(text: str, fields: tuple[str, ...], tool: str, out: Parsed):
    """(job key, row) for each job line of `text`; steps are skipped, bad lines go to out.problems. The key
    of a heterogeneous job's leader (20+0) is the job id (20), its other components keep theirs (20+1)."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != len(fields):
            out.problems.append(
                f"{tool} line {n}: {line[:120]!r} (expected {len(fields)} '|'-separated fields, got {len(parts)})"
            )
            continue
        m = _JOB_ID.match(parts[0])
        if not m:
            out.problems.append(f"{tool} line {n}: {line[:120]!r} (job id {parts[0][:40]!r} not understood)")
            continue
        if m.group("step"):
            continue
        het = m.group("het")
        row = _clean(dict(zip(fields[1:], parts[1:])))
        yield (m.group("job") if het in (None, "0") else f"{m.group('job')}+{het}"), row


def parse_sacct(text: str, fields: tuple[str, ...] = SACCT_FIELDS) -> Parsed:
    """`sacct --parsable2 --noheader --format=<fields>` output. With --duplicates every attempt of a
    requeued job is a row, oldest first: the newest wins and `attempts` counts them. Job steps
    (12.batch, 12.0) are skipped; an array's pending remainder (15_[4-6]) is expanded."""
    out = Parsed()
    for jid, row in _rows(text, fields, "sacct", out):
        for one in expand_job_id(jid):
            attempts = out.jobs.get(one, {}).get("attempts", 0) + 1
            out.jobs[one] = {**row, "attempts": attempts}
    return out


def parse_squeue(text: str, fields: tuple[str, ...] = SQUEUE_FIELDS) -> Parsed:
    """`squeue --noheader --array --format=<SQUEUE_FORMAT>` output (one row per array task)."""
    out = Parsed()
    for jid, row in _rows(text, fields, "squeue", out):
        for one in expand_job_id(jid):
            out.jobs[one] = {**row, "ExitCode": None, "attempts": 1}
    return out


def warn_problems(problems: list[str]) -> None:
    """Lines SLURM printed that the parsers did not understand: a warning each (`launch` shows them)."""
    for problem in problems:
        log.warning("SLURM output not understood, ignored: %s", problem)


def _run(cmd: list[str], timeout: float = 60) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found: run this where the SLURM client tools are installed") from None
    except subprocess.CalledProcessError as e:
        why = (e.stderr.strip().splitlines() or [str(e.returncode)])[-1]
        raise UserError(f"{cmd[0]} failed ({why}); is SLURM (and its accounting) up?") from None
    except subprocess.TimeoutExpired:
        raise UserError(
            f"{cmd[0]} did not answer within {timeout:g} s; the controller or its database may be down, try again"
        ) from None


def job_states(job_ids: list[str]) -> Parsed:
    """SLURM's view of any number of jobs and array tasks: one sacct call, then one squeue call for what
    accounting has not received yet (seconds after sbatch) and for the pending reasons."""
    wanted = set(job_ids)
    base = sorted({j.split("_")[0] for j in wanted}, key=int)
    if not base:
        return Parsed()
    found = parse_sacct(
        _run(
            [
                "sacct",
                "--allocations",
                "--duplicates",
                "--parsable2",
                "--noheader",
                f"--format={','.join(SACCT_FIELDS)}",
                f"--jobs={','.join(base)}",
            ]
        )
    )
    for jid in wanted - set(found.jobs):  # an array cancelled before any task started is one row: "15"
        if "_" in jid and jid.split("_")[0] in found.jobs:
            found.jobs[jid] = found.jobs[jid.split("_")[0]]
    queued = [
        j for j in base if any(s.get("State") == "PENDING" for k, s in found.jobs.items() if k.split("_")[0] == j)
    ]
    missing = sorted({j.split("_")[0] for j in wanted - set(found.jobs)} | set(queued), key=int)
    if missing:
        try:
            text = _run(
                [
                    "squeue",
                    "--noheader",
                    "--array",
                    "--states=all",
                    f"--format={SQUEUE_FORMAT}",
                    f"--jobs={','.join(missing)}",
                ]
            )
        except UserError:  # squeue refuses ids the controller has forgotten: those stay UNKNOWN
            text = ""
        live = parse_squeue(text)
        found.problems += live.problems
        for jid, row in live.jobs.items():  # the controller is newer than accounting
            old = found.jobs.get(jid, {})
            found.jobs[jid] = {**old, **row, "attempts": old.get("attempts", 1), "ExitCode": old.get("ExitCode")}
    warn_problems(found.problems)
    return found


def slurm_available(timeout: float = 5.0) -> bool:
    """sbatch and srun on PATH and the controller answers `scontrol ping` (bounded: never hangs)."""
    if not all(shutil.which(tool) for tool in ("sbatch", "srun", "scontrol")):
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and " is UP" in out.stdout


def controller_max_array_size(timeout: float = 3.0) -> int | None:
    """MaxArraySize of the running controller (None where SLURM is absent)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m else None


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])


# ------------------------------------------------------------------------------------------ nodes

SINFO_FORMAT = "%N|%P|%c|%m|%G|%f|%T"  # node, partition (* = default), CPUs, memory MB, GRES, features, state
_FLAGS = "*~#!%$@^-"  # a node state's flag suffixes (sinfo(1) NODE STATE CODES): "idle~", "mixed-"
_GPU_GRES = re.compile(r"^gpu(?::([^:(]+))?:(\d+)")


@dataclass(frozen=True)
class Node:
    name: str
    partition: str
    default: bool  # in the cluster's default partition
    cpus: int
    mem_mb: int
    gpus: dict[str, int]  # GPU type ("" when untyped) -> count
    features: frozenset[str]
    state: str

    def gpu_count(self, gpu_type: str | None) -> int:
        return self.gpus.get(gpu_type, 0) if gpu_type else sum(self.gpus.values())


def parse_sinfo(text: str) -> tuple[list[Node], list[str]]:
    """Nodes from `sinfo --Node --noheader --format=SINFO_FORMAT` (and the lines that did not parse)."""
    nodes, problems = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        try:
            name, part, cpus, mem, gres, features, state = parts
            gpus: dict[str, int] = {}
            for g in gres.split(","):
                m = _GPU_GRES.match(g.strip())
                if m:
                    gpus[m.group(1) or ""] = gpus.get(m.group(1) or "", 0) + int(m.group(2))
            feats = frozenset() if features in ("(null)", "") else frozenset(features.split(","))
            nodes.append(
                Node(name, part.rstrip("*"), part.endswith("*"), int(cpus), int(mem), gpus, feats, state.rstrip(_FLAGS))
            )
        except ValueError:
            problems.append(line)
    return nodes, problems


def sinfo_nodes(timeout: float = 10.0) -> list[Node] | None:
    """Every node of every partition as SLURM reports it (a node once per partition); None where SLURM does
    not answer."""
    try:
        out = subprocess.run(
            ["sinfo", "--Node", "--noheader", f"--format={SINFO_FORMAT}"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    nodes, problems = parse_sinfo(out.stdout)
    warn_problems([f"sinfo: {line[:120]!r} (expected {SINFO_FORMAT})" for line in problems])
    return nodes
