"""`launch status | logs | cancel | resubmit` for submitted runs and sweeps (each with --json, schema 1).

    launch status RUN_OR_SWEEP [--task I ...] [--json]   every task: state, nodes, step, loss, elapsed
    launch logs RUN_OR_SWEEP [--task I] [--node K] [--follow] [--json]
    launch cancel RUN_OR_SWEEP [--task I ...] [--json]
    launch resubmit RUN_OR_SWEEP [--task I ...] [--partition P ...] [--json]  failed/cancelled tasks resume

RUN_OR_SWEEP is the folder `launch` printed, a task folder inside a sweep, or a name under the runs folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from launcher import jobs, slurm
from launcher.profiles import add_profile_flags, profile_overrides
from telepathy.errors import UserError

SCHEMA = 1


def register(sub) -> None:
    def common(p, many_tasks: bool = True) -> None:
        p.add_argument("target", metavar="RUN_OR_SWEEP", help="run or sweep folder (or a name under the runs folder)")
        if many_tasks:
            p.add_argument(
                "--task",
                type=int,
                action="append",
                default=None,
                metavar="I",
                help="only task I of a sweep (repeatable)",
            )
        else:
            p.add_argument("--task", type=int, default=None, metavar="I", help="task I of a sweep")
        p.add_argument("--runs-dir", help="where run folders go (default ./runs; env TELEPATHY_RUNS)")
        p.add_argument("--json", action="store_true", help="machine-readable output (stable schema)")

    p = sub.add_parser("status", help="state, node, step, loss and elapsed time of every task of a run or sweep")
    common(p)
    p.set_defaults(handler=handle_status)
    p = sub.add_parser("logs", help="the SLURM log of a task (all its ranks' output on that node)")
    common(p, many_tasks=False)
    p.add_argument("--node", type=int, default=0, metavar="K", help="the log of node K of a multi-node job")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the task leaves the queue")
    p.set_defaults(handler=handle_logs)
    p = sub.add_parser("cancel", help="cancel the queued or running tasks of a run or sweep")
    common(p)
    p.set_defaults(handler=handle_cancel)
    p = sub.add_parser(
        "resubmit",
        help="submit failed or cancelled tasks again; they resume from their checkpoints "
        "(profile flags such as --partition or --time-limit-min change their plans, and are recorded)",
    )
    common(p)
    add_profile_flags(p, cluster=False)
    p.set_defaults(handler=handle_resubmit)


def _load(args) -> tuple[jobs.JobRecord, list[int] | None]:
    root, selected = jobs.submitted_root(args.target, args.runs_dir)
    record = jobs.JobRecord.load(root.path)
    wanted = args.task if isinstance(args.task, list) else ([args.task] if args.task is not None else None)
    if wanted is not None and selected is not None and set(wanted) - set(selected):
        raise UserError(f"{args.target} is task {selected[0]} of its sweep; drop --task or pass the sweep folder")
    return record, wanted if wanted is not None else selected


def handle_status(args) -> int:
    record, indices = _load(args)
    rows = jobs.task_status(record, indices)
    if args.json:
        print(json.dumps({"schema": SCHEMA, "root": record.root, "kind": record.kind, "tasks": rows}, indent=2))
    else:
        print(jobs.format_status(record, rows))
    return 0


def handle_logs(args) -> int:
    record, indices = _load(args)
    tasks = record.select(indices)
    if len(tasks) != 1:
        raise UserError(f"{record.root} is a sweep of {len(tasks)} tasks; pick one with --task I (0-{len(tasks) - 1})")
    task = tasks[0]
    path = jobs.log_path(record, task, args.node)
    if path is None:
        raise UserError(f"task {task.index} ({task.name}) was never submitted; nothing to show")
    if args.json:
        if args.follow:
            raise UserError("--follow streams text; drop --json")
        text = path.read_text(errors="replace") if path.exists() else None
        print(
            json.dumps(
                {
                    "schema": SCHEMA,
                    "root": record.root,
                    "task": task.index,
                    "name": task.name,
                    "job_id": task.job_id,
                    "node": args.node,
                    "path": str(path),
                    "text": text,
                },
                indent=2,
            )
        )
        return 0
    if not args.follow:
        if not path.exists():
            raise UserError(f"no log yet at {path} (job {task.job_id} has not started); try again or use --follow")
        sys.stdout.write(path.read_text(errors="replace"))
        return 0
    _follow(path, task.job_id)
    return 0


def _follow(path: Path, job_id: str, poll_s: float = 0.5, state_every_s: float = 5.0) -> None:
    """Print the log as it grows until its job is no longer queued or running (a requeue appends to the
    same file and keeps following)."""
    offset, next_check = 0, 0.0
    while True:
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            if chunk:
                offset += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
        if time.monotonic() >= next_check:
            state = slurm.job_states([job_id]).jobs.get(job_id, {}).get("State", "UNKNOWN")
            if state != "UNKNOWN" and not slurm.is_active(state):
                if path.exists() and path.stat().st_size > offset:
                    continue  # print the rest first
                print(f"[launch logs] job {job_id} ended: {state}", file=sys.stderr)
                return
            next_check = time.monotonic() + state_every_s
        time.sleep(poll_s)


def handle_cancel(args) -> int:
    record, indices = _load(args)
    cancelled = jobs.cancel(record, indices)
    if args.json:
        print(json.dumps({"schema": SCHEMA, "root": record.root, "cancelled": cancelled}, indent=2))
    elif cancelled:
        print(f"cancelled {len(cancelled)} job(s): {' '.join(cancelled)}")
    else:
        print("nothing queued or running to cancel")
    return 0


def handle_resubmit(args) -> int:
    from launcher.submit import resubmit  # noqa: PLC0415  (imports submitit)

    record, indices = _load(args)
    result = resubmit(record, indices, profile_overrides(args))
    if args.json:
        print(json.dumps({"schema": SCHEMA, **result.to_dict()}, indent=2))
    else:
        print(result.summary())
    return 0
