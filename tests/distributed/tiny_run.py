"""Shared by the trainer tests: a tiny real run (tiny-llama -> tiny-qwen on the shipped demo task) and the
plumbing to start it as real worker processes (plain python or torchrun) and read what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from launcher.profiles import TORCHRUN_ENV
from telepathy.config import RunConfig
from telepathy.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
# DeepSpeed JIT-compiles its CPU comm op on first use (~35-75 s): keep the build in one known place.
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "telepathy" / "torch_extensions"))


def tiny_config(run_dir: Path, backend: str = "ddp", **train) -> RunConfig:
    """fp32 bridge: the frozen models are bf16 and identical everywhere, so runs that see the same
    micro-batches differ only in the order gradients are summed; fp32 keeps that at ~1e-7 (bf16 would be ~1e-2)."""
    settings = {
        "steps": 4,
        "micro_batch": 2,
        "grad_accum": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "checkpoint_every": 100,
        "log_every": 1,
        "seed": 3,
    }
    settings.update(train)
    cfg = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir=str(run_dir), backend=backend)
    cfg = cfg.replace(
        bridge={"soft_tokens": 4, "depth": 1, "heads": 4},
        train=settings,
        data={"task": "demo", "eval_samples": 4},
        eval={"baselines": (), "latency_samples": 0, "max_new_tokens": 3, "batch_size": 4},
    )
    cfg.save(cfg.dir.config)
    return cfg


def worker_env() -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=EXTENSIONS,
        DS_ACCELERATOR="cpu",
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        **TORCHRUN_ENV,
    )


def worker_command(cfg: RunConfig, nproc: int, max_restarts: int = 0) -> list[str]:
    """`max_restarts`: torchrun's --max-restarts, as launcher/plan.py passes a profile's max_restarts."""
    config = str(cfg.dir.config)
    if nproc == 1:
        return [sys.executable, "-m", "telepathy.train", "--config", config]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}"]
    if max_restarts:
        torchrun.append(f"--max-restarts={max_restarts}")
    return [*torchrun, "-m", "telepathy.train", "--config", config]


def start(cfg: RunConfig, nproc: int, max_restarts: int = 0, faults: str = "") -> subprocess.Popen:
    """`faults`: TELEPATHY_FAULT for the workers (telepathy/faults.py)."""
    log = open(Path(cfg.run_dir) / f"launch_{time.monotonic_ns()}.log", "w")
    env = dict(worker_env(), TELEPATHY_FAULT=faults)
    return subprocess.Popen(
        worker_command(cfg, nproc, max_restarts),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills the workers too, not only torchrun
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # a hung worker left behind would hold its CPU for the whole suite
        proc.wait()
        raise


class Background:
    """A tiny run started now and waited for by `result()`, so a test can run its own workers meanwhile."""

    def __init__(self, cfg: RunConfig, **start_args):
        self.cfg, self.t0 = cfg, time.monotonic()
        self.proc, self.rc, self.wall_s = start(cfg, 2, **start_args), None, None
        threading.Thread(target=self._timed, daemon=True).start()

    def _timed(self) -> None:
        self.proc.wait()
        self.wall_s = time.monotonic() - self.t0  # when it ended, not when a test got round to asking

    def wait(self, timeout: float = 240) -> int:
        if self.rc is None:
            self.rc = finish(self.proc, timeout)
        return self.rc

    def result(self) -> RunConfig:
        assert self.wait() == 0, output(self.cfg)
        return self.cfg

    def stop(self) -> None:
        if self.proc.poll() is None:  # SIGTERM: torchrun passes it to its workers (SIGKILL would orphan them)
            self.proc.terminate()
            finish(self.proc, 60)


def launch(cfg: RunConfig, nproc: int, timeout: float = 240, max_restarts: int = 0, faults: str = "") -> int:
    return finish(start(cfg, nproc, max_restarts, faults), timeout)


def output(cfg: RunConfig) -> str:
    return "\n".join(p.read_text() for p in sorted(Path(cfg.run_dir).glob("launch_*.log")))


def train_records(run_dir: str | Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    if not path.exists():
        return []
    return [r for line in path.read_text().splitlines() if line.strip() and (r := json.loads(line))["kind"] == "train"]


def losses(run_dir: str | Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_records(run_dir)}


def final_bridge(run_dir: str | Path):
    from telepathy.checkpoint import latest_valid

    return latest_valid(RunDir(run_dir)).bridge()


def wait_for_step(run_dir: str | Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in train_records(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker ended (rc {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")
