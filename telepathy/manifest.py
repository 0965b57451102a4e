"""The run manifest: what ran, where, on which code and software, and how it ended.

Written by rank 0 at the start of every attempt (a SLURM requeue is a new attempt of the same run) and
again at its end. Torch-free: versions come from package metadata, the GPU name from torch only when the
trainer has already imported it. The environment is never dumped; only the SLURM ids in `SLURM_VARS` are
read, so tokens and keys in the environment cannot reach the file; and every write is redacted by the one
secret predicate (telepathy/secrets.py), whatever the copied plan and config hold.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from telepathy.config import RunConfig
from telepathy.errors import UserError
from telepathy.files import atomic_write_json, read_json, utc_now
from telepathy.paths import REPO_ROOT
from telepathy.rundir import RunDir
from telepathy.secrets import redact

# Written into a code snapshot (a copy without .git) at snapshot time by `record_code_version`.
CODE_VERSION_FILE = "code_version.json"
# The only environment variables a manifest records (an allow-list: secrets must never leak).
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
PACKAGES = ("torch", "transformers", "submitit", "deepspeed")
EXIT_STATES = ("running", "completed", "preempted", "failed")
SCHEMA = 1


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
        return {
            "commit": head.strip(),
            "dirty": None if status is None else bool(status.strip()),
            "source": "git",
            "path": str(code_dir),
        }
    return {"commit": None, "dirty": None, "source": "unknown", "path": str(code_dir)}


def record_code_version(checkout: str | Path, snapshot_dir: str | Path) -> dict[str, Any]:
    """At snapshot time: store the checkout's commit and dirty flag in the snapshot, for its manifests."""
    version = code_version(checkout)
    record = {
        "commit": version["commit"],
        "dirty": version["dirty"],
        "checkout": str(Path(checkout).absolute()),
        "recorded_at": utc_now(),
    }
    atomic_write_json(Path(snapshot_dir) / CODE_VERSION_FILE, record)
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
        hw["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 2)
    return hw


def slurm_ids() -> dict[str, str]:
    return {k: os.environ[k] for k in SLURM_VARS if k in os.environ}


def plan_summary(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    """The memory source the planner used: a table row, or the analytic estimate, and the prediction."""
    if not plan:
        return None
    batch, mem = plan.get("batch", {}), plan.get("memory", {})
    return {
        "batch_source": batch.get("source"),
        "table_row": batch.get("table_row"),
        "micro_batch": batch.get("micro_batch"),
        "grad_accum": batch.get("grad_accum"),
        "global_batch": batch.get("global_batch"),
        "estimate_gib": mem.get("total_gib"),
        "estimate_components": mem.get("components"),
        "notes": batch.get("notes", []),
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except UserError:  # a damaged manifest is replaced, not fatal
        return None


def _attempt() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "slurm": slurm_ids(),
        "started_at": utc_now(),
        "ended_at": None,
        "exit": {"state": "running"},
    }


def start(cfg: RunConfig, code_dir: str | Path = REPO_ROOT) -> dict[str, Any]:
    """Write the manifest for a new attempt; earlier attempts of this run (requeues) are kept in `attempts`."""
    run_dir = cfg.dir
    old = _read_json(run_dir.manifest) or {}
    attempts = list(old.get("attempts", []))
    attempt = _attempt()
    plan = _read_json(run_dir.plan)
    manifest = {
        "schema": SCHEMA,
        "run": cfg.name,
        "run_dir": str(run_dir.path),
        "config": cfg.to_dict(),
        "plan": plan,
        "memory_plan": plan_summary(plan),
        "predicted_peak_gib": cfg.predicted_peak_gib,
        "code": code_version(code_dir),
        "software": software_versions(),
        "hardware": hardware(),
        **attempt,
        "attempts": attempts + [attempt],
    }
    _write(run_dir, manifest)
    return manifest


def finish(run_dir: str | Path, state: str, error: BaseException | None = None) -> dict[str, Any]:
    """Record how this attempt ended: completed, preempted, or failed (with the error's type only:
    messages can carry paths or credentials)."""
    if state not in EXIT_STATES[1:]:
        raise ValueError(f"exit state must be one of {EXIT_STATES[1:]}, got {state!r}")
    run_dir = RunDir(run_dir)
    manifest = _read_json(run_dir.manifest) or {"schema": SCHEMA, "attempts": [_attempt()]}
    exit_ = {"state": state}
    if error is not None:
        exit_["error_type"] = f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins.")
    manifest.update(ended_at=utc_now(), exit=exit_)
    if manifest.get("attempts"):
        manifest["attempts"][-1].update(ended_at=manifest["ended_at"], exit=exit_)
    _write(run_dir, manifest)
    return manifest


def record_cost(run_dir: str | Path, seconds: dict[str, float], wall_s: float, device: str, devices: int) -> dict:
    """This attempt's wall seconds per phase (load, cache, train, eval), and the run's totals over all its
    attempts: seconds and device-seconds (wall x the devices the job holds: GPU-seconds on GPUs,
    CPU-process-seconds on CPUs), what `launch report` sums per method."""
    run_dir = RunDir(run_dir)
    manifest = _read_json(run_dir.manifest) or {"schema": SCHEMA, "attempts": [_attempt()]}
    cost = {
        "device": device,
        "devices": devices,
        "wall_s": round(wall_s, 3),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "device_seconds": {k: round(v * devices, 3) for k, v in seconds.items()},
    }
    attempts = manifest.setdefault("attempts", [_attempt()])
    attempts[-1]["cost"] = cost
    costs = [a["cost"] for a in attempts if "cost" in a]
    manifest["cost"] = {
        "device": device,
        "devices": devices,
        "attempts": len(costs),
        "wall_s": round(sum(c["wall_s"] for c in costs), 3),
        **{
            key: {k: round(sum(c[key].get(k, 0.0) for c in costs), 3) for k in seconds}
            for key in ("seconds", "device_seconds")
        },
    }
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


def _write(run_dir: RunDir, manifest: dict[str, Any]) -> None:
    atomic_write_json(run_dir.manifest, redact(manifest))  # every write, whatever a plan or config holds


def load(run_dir: str | Path) -> dict[str, Any] | None:
    return _read_json(RunDir(run_dir).manifest)
