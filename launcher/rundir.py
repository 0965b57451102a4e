"""Run folders: where a run's config, plan, logs, checkpoints, metrics and results live."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from telepathy.errors import UserError

DEFAULT_RUNS_DIR = "runs"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}$")


def runs_root(flag: str | None) -> Path:
    return Path(flag or os.environ.get("TELEPATHY_RUNS") or DEFAULT_RUNS_DIR).expanduser().absolute()


def check_name(name: str) -> str:
    """Run names become folder and SLURM job names: letters, digits and . _ + = - only."""
    if not _NAME.match(name):
        raise UserError(f"run name {name!r} is not allowed; use letters, digits and . _ + = - (at most 128, "
                        "not starting with a symbol)")
    return name


def default_name(pair_name: str, task: str) -> str:
    task = Path(task).stem if ("/" in task or task.endswith((".jsonl", ".csv"))) else task
    return check_name(re.sub(r"[^A-Za-z0-9._+=-]", "_", f"{pair_name}-{task}-{time.strftime('%Y%m%d-%H%M%S')}"))


def write_run_files(plan, run_dir: Path) -> None:
    """config.json (what the worker reads) and plan.json (what the launcher decided), both atomic."""
    if (run_dir / "plan.json").exists():
        raise UserError(f"run folder {run_dir} already holds a run; choose another --name (or `launch resubmit {run_dir}`)")
    plan.run.save(run_dir / "config.json")
    plan.save(run_dir / "plan.json")
