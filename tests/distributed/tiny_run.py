"""Shared by the trainer tests: a tiny real run (tiny-llama -> tiny-qwen on the shipped demo task) and the
plumbing to start it as real worker processes (plain python or torchrun) and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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
    )


def worker_command(cfg: RunConfig, nproc: int) -> list[str]:
    config = str(cfg.dir.config)
    if nproc == 1:
        return [sys.executable, "-m", "telepathy.train", "--config", config]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "telepathy.train", "--config", config]


def start(cfg: RunConfig, nproc: int) -> subprocess.Popen:
    log = open(Path(cfg.run_dir) / f"launch_{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(
        worker_command(cfg, nproc), cwd=REPO, env=worker_env(), stdout=log, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def launch(cfg: RunConfig, nproc: int, timeout: float = 240) -> int:
    return finish(start(cfg, nproc), timeout)


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
