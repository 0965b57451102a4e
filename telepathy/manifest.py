"""Run manifest `RUN/manifest.json`: what ran, where, on which code and software, and how it ended.

Written by rank 0 at the start of every attempt (a SLURM requeue is a new attempt of the same run) and
again at its end. Torch-free: versions come from package metadata, the GPU name from torch only when the
trainer has already imported it. The environment is never dumped; only the SLURM ids in `SLURM_VARS` are
read, so tokens and keys in the environment cannot reach the file.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from telepathy.config import RunConfig, atomic_write_text
from telepathy.paths import REPO_ROOT

MANIFEST_FILE = "manifest.json"
# Written into a code snapshot (a copy without .git) at snapshot time by `record_code_version`.
CODE_VERSION_FILE = "code_version.json"
# The only environment variables a manifest records (an allow-list: secrets must never leak).
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
PACKAGES = ("torch", "transformers", "submitit", "deepspeed")
# A copied plan can hold a cluster profile's `env` and `setup` lines: values of secret-looking names are redacted.
_SECRET_NAME = re.compile(r"(?i)(token|secret|passw(or)?d|credential|(^|_)key$|api_?key)")
_SECRET_ASSIGN = re.compile(
    r"(?i)\b([A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|KEY)[A-Z0-9_]*)=(\"[^\"]*\"|'[^']*'|\S+)")
EXIT_STATES = ("running", "completed", "preempted", "failed")
SCHEMA = 1


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(code_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(code_dir), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git binary, or it hung
        return None
    return out.stdout if out.returncode == 0 else None


def code_version(code_dir: str | Path = REPO_ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the code in `code_dir`: from git when it is a checkout, else from the
    CODE_VERSION_FILE a snapshot carries; unknown (None) otherwise. Never raises."""
    code_dir = Path(code_dir)
    recorded = code_dir / CODE_VERSION_FILE
    if recorded.is_file():  # a snapshot: its own .git (if any) is not the code's history
        try:
            d = json.loads(recorded.read_text())
            return {"commit": d.get("commit"), "dirty": d.get("dirty"), "source": "snapshot", "path": str(code_dir)}
        except (OSError, json.JSONDecodeError):
            pass
    head = _git(code_dir, "rev-parse", "HEAD")
    if head:
        status = _git(code_dir, "status", "--porcelain", "--untracked-files=no")
        return {"commit": head.strip(), "dirty": None if status is None else bool(status.strip()),
                "source": "git", "path": str(code_dir)}
    return {"commit": None, "dirty": None, "source": "unknown", "path": str(code_dir)}


def record_code_version(checkout: str | Path, snapshot_dir: str | Path) -> dict[str, Any]:
    """At snapshot time: store the checkout's commit and dirty flag in the snapshot, for its manifests."""
    version = code_version(checkout)
    record = {"commit": version["commit"], "dirty": version["dirty"], "checkout": str(Path(checkout).absolute()),
              "recorded_at": now()}
    atomic_write_text(Path(snapshot_dir) / CODE_VERSION_FILE, json.dumps(record, indent=2) + "\n")
    return record


def software_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["cuda"] = getattr(torch.version, "cuda", None)
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    hw: dict[str, Any] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": None, "gpu_count": 0}
    torch = sys.modules.get("torch")  # only if the trainer loaded it: the manifest never pulls torch in
    if torch is not None and torch.cuda.is_available():
        hw["gpu_count"] = torch.cuda.device_count()
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 1024 ** 3, 2)
    return hw


def slurm_ids() -> dict[str, str]:
    return {k: os.environ[k] for k in SLURM_VARS if k in os.environ}


def plan_summary(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The memory source the planner used: a table row, or the analytic estimate, and the prediction."""
    if not plan:
        return None
    batch, mem = plan.get("batch", {}), plan.get("memory", {})
    return {"batch_source": batch.get("source"), "table_row": batch.get("table_row"),
            "micro_batch": batch.get("micro_batch"), "grad_accum": batch.get("grad_accum"),
            "global_batch": batch.get("global_batch"), "estimate_gib": mem.get("total_gib"),
            "estimate_components": mem.get("components"), "notes": batch.get("notes", [])}


def redact(value: Any) -> Any:
    """A copy with the values of secret-looking keys, and of NAME=value assignments in strings, replaced."""
    if isinstance(value, dict):
        return {k: "<redacted>" if _SECRET_NAME.search(str(k)) and isinstance(v, str) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _SECRET_ASSIGN.sub(r"\1=<redacted>", value)
    return value


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _attempt() -> dict[str, Any]:
    return {"host": socket.gethostname(), "slurm": slurm_ids(), "started_at": now(), "ended_at": None,
            "exit": {"state": "running"}}


def start(cfg: RunConfig, code_dir: str | Path = REPO_ROOT) -> dict[str, Any]:
    """Write the manifest for a new attempt; earlier attempts of this run (requeues) are kept in `attempts`."""
    run_dir = Path(cfg.run_dir)
    old = _read_json(run_dir / MANIFEST_FILE) or {}
    attempts = list(old.get("attempts", []))
    attempt = _attempt()
    plan = redact(_read_json(run_dir / "plan.json"))
    manifest = {
        "schema": SCHEMA, "run": cfg.name, "run_dir": str(run_dir), "config": cfg.to_dict(), "plan": plan,
        "memory_plan": plan_summary(plan), "predicted_peak_gib": cfg.predicted_peak_gib,
        "code": code_version(code_dir), "software": software_versions(), "hardware": hardware(),
        **attempt, "attempts": attempts + [attempt],
    }
    _write(run_dir, manifest)
    return manifest


def finish(run_dir: str | Path, state: str, error: BaseException | None = None) -> dict[str, Any]:
    """Record how this attempt ended: completed, preempted, or failed (with the error's type only:
    messages can carry paths or credentials)."""
    if state not in EXIT_STATES[1:]:
        raise ValueError(f"exit state must be one of {EXIT_STATES[1:]}, got {state!r}")
    run_dir = Path(run_dir)
    manifest = _read_json(run_dir / MANIFEST_FILE) or {"schema": SCHEMA, "attempts": [_attempt()]}
    exit_ = {"state": state}
    if error is not None:
        exit_["error_type"] = f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins.")
    manifest.update(ended_at=now(), exit=exit_)
    if manifest.get("attempts"):
        manifest["attempts"][-1].update(ended_at=manifest["ended_at"], exit=exit_)
    _write(run_dir, manifest)
    return manifest


@contextmanager
def recorded(cfg: RunConfig, enabled: bool = True, preempted: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """`with manifest.recorded(cfg, enabled=rank == 0):` around a run: start, then completed / failed, or
    preempted when the body raises one of `preempted` (re-raised either way)."""
    if not enabled:
        yield
        return
    start(cfg)
    try:
        yield
    except preempted:
        finish(cfg.run_dir, "preempted")
        raise
    except BaseException as e:
        finish(cfg.run_dir, "failed", e)
        raise
    finish(cfg.run_dir, "completed")


def _write(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(run_dir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def load(run_dir: str | Path) -> dict[str, Any] | None:
    return _read_json(Path(run_dir) / MANIFEST_FILE)
