"""Helpers of the SLURM tests: tiny real plans, waiting on real jobs, the real CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launcher import jobs, slurm
from launcher.plan import Plan, make_plan
from launcher.profiles import load_profile
from telepathy.config import RunConfig
from telepathy.registry import load_registry
from telepathy.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
PAIR = "tiny-llama-tiny-qwen"


def tiny_run(run_dir: Path, *, name: str | None = None, **train) -> RunConfig:
    """tiny-llama -> tiny-qwen on the shipped demo task; fp32 bridge so resumed runs compare bitwise;
    evaluation cut to the bridge on 4 samples (the jobs, not evaluation, are under test here)."""
    settings = {
        "steps": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "checkpoint_every": 100,
        "log_every": 1,
        "seed": 3,
    }
    settings.update(train)
    cfg = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir=str(run_dir), name=name or Path(run_dir).name)
    return cfg.replace(
        bridge={"soft_tokens": 4, "depth": 1, "heads": 4},
        train=settings,
        data={"task": "demo", "eval_samples": 4},
        eval={"baselines": (), "latency_samples": 0, "max_new_tokens": 3, "batch_size": 4},
    )


def tiny_plan(cfg: RunConfig, *, gpus: int = 1, **profile) -> Plan:
    prof = load_profile("local", {k: str(v) for k, v in profile.items()}, environ={})
    return make_plan(load_registry().pair(PAIR), cfg, gpus=gpus, profile=prof, mode="slurm", global_batch=8)


def status(root: Path | str) -> list[dict]:
    return jobs.task_status(jobs.JobRecord.load(root))


def wait_done(root: Path | str, timeout: float = 300, poll: float = 1.0) -> list[dict]:
    """Until no task of the run/sweep is queued or running (one sacct call per poll)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = status(root)
        if all(r["job_id"] is None or not slurm.is_active(r["state"]) and r["state"] != "UNKNOWN" for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"still running after {timeout} s: {rows}\n{logs(root)}")
        time.sleep(poll)


def wait_for(predicate, what: str, timeout: float = 240, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)
    return value


def logs(root: Path | str) -> str:
    return "\n".join(f"== {p}\n{p.read_text(errors='replace')}" for p in sorted(Path(root).glob("slurm/*_log.out")))


def launch(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, **(env or {})),
        timeout=timeout,
    )


def launch_json(*args: str) -> dict:
    out = launch(*args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def last_step(run_dir: Path | str) -> int:
    return (jobs.last_train_record(RunDir(run_dir)) or {}).get("step", 0)


def with_profile(
    plan: Plan, *, env: dict | None = None, setup: tuple[str, ...] = (), srun_args: tuple[str, ...] = ()
) -> Plan:
    """The plan with variables added to its profile's `env`, lines to its `setup`, options to its `srun_args`."""
    prof = plan.profile
    prof = dataclasses.replace(
        prof,
        env={**prof.env, **(env or {})},
        setup=(*prof.setup, *setup),
        srun_args=(*prof.srun_args, *srun_args),
    )
    return dataclasses.replace(plan, profile=prof)


def task_processes(job_id: str, node: int, needle: str) -> list:
    """The processes of SLURM job `job_id` on node `node` (by SLURM_JOB_ID and SLURM_NODEID in their
    environment, as slurmstepd set them) whose command line contains `needle`."""
    import psutil  # noqa: PLC0415

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_NODEID") == str(node):
            if needle in " ".join(p.info["cmdline"] or ()):
                found.append(p)
    return found
