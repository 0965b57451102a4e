"""Where run folders go, what they may be called, and which folder a RUN_OR_SWEEP argument means."""

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
        raise UserError(
            f"run name {name!r} is not allowed; use letters, digits and . _ + = - (at most 128, "
            "not starting with a symbol)"
        )
    return name


def default_name(pair_name: str, task: str) -> str:
    task = Path(task).stem if ("/" in task or task.endswith((".jsonl", ".csv", ".yaml"))) else task
    return check_name(re.sub(r"[^A-Za-z0-9._+=-]", "_", f"{pair_name}-{task}-{time.strftime('%Y%m%d-%H%M%S')}"))


def resolve(target: str, runs_dir: str | None) -> Path:
    """A RUN_OR_SWEEP argument: a folder as given, else a name under the runs folder."""
    given = Path(target).expanduser()
    if given.exists() or given.is_absolute():
        return given.absolute()
    named = runs_root(runs_dir) / target
    return named if named.exists() else given.absolute()
