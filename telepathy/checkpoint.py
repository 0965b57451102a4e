"""Atomic, verifiable training checkpoints: write, find the newest good one, prune.

Layout: `RUN/checkpoints/step_000123/` holding
  bridge.safetensors   full bridge weights (gathered from any backend, so they are backend-independent)
  optimizer.pt         full AdamW state keyed by parameter name (DDP/FSDP/single; portable across those)
  deepspeed/           DeepSpeed's own ZeRO-partitioned optimizer state (DeepSpeed only: same backend and
                       world size to resume it; the bridge weights above stay portable)
  state.json           step, sampler position, LR scheduler, backend, world size
  rng_rank{r}.pt       each rank's python / numpy / torch / CUDA generator states
  manifest.json        sha256 + size of every file above; written last = the "complete" marker

Every rank writes its files into `.tmp_step_000123/`, rank 0 then fsyncs and checksums them, writes the
manifest and renames the folder into place, so a reader sees a whole checkpoint or none. `latest_valid`
re-hashes and falls back to the previous checkpoint when the newest is damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from telepathy.config import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BRIDGE = "bridge.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
DEEPSPEED_DIR = "deepspeed"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:06d}"


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x: Any) -> Any:
    # random.setstate insists on tuples; a round trip through some loaders turns them into lists
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------- save


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(
    run_dir: str | Path,
    step: int,
    *,
    bridge: dict[str, torch.Tensor] | None,
    optimizer: dict[str, Any] | None,
    state: dict[str, Any] | None,
    keep: int,
    write_rank_files: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank calls it. `bridge`/`optimizer`/`state` are used on rank 0 (None elsewhere);
    `write_rank_files(folder)` runs on every rank for backend-sharded state (DeepSpeed)."""
    rank = _rank()
    final = step_dir(run_dir, step)
    tmp = final.with_name(".tmp_" + final.name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a write that died half-way
        tmp.mkdir(parents=True)
    _barrier()
    if rank == 0:
        assert bridge is not None and state is not None
        save_file({k: v.detach().contiguous().cpu() for k, v in bridge.items()}, str(tmp / BRIDGE))
        if optimizer is not None:
            torch.save(optimizer, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True) + "\n")
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if write_rank_files is not None:
        write_rank_files(tmp)
    _barrier()
    if rank == 0:
        files = {}
        for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
            _fsync(p)
            files[str(p.relative_to(tmp))] = {"sha256": _sha256(p), "bytes": p.stat().st_size}
        atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=2) + "\n")
        if final.exists():  # an unverifiable leftover of the same step (we resumed from before it)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(final.parent)
        prune(run_dir, keep)
        log.info("checkpoint %s written (%d files)", final, len(files) + 1)
    _barrier()  # nobody moves on (or exits after preemption) before the checkpoint is in place
    return final


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for _, path in _step_dirs(run_dir)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def discard_after(run_dir: str | Path, step: int) -> None:
    """Remove checkpoints newer than the one we resume from: they failed verification and would otherwise
    count towards `keep` and push out the good ones."""
    for s, path in _step_dirs(run_dir):
        if s > step:
            log.warning("removing unusable checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)


def _step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint folder, newest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE).read_text())

    def bridge(self) -> dict[str, torch.Tensor]:
        # safetensors maps the file into memory: copy, so the tensors never change with the file
        return {k: v.clone() for k, v in load_file(str(self.path / BRIDGE)).items()}

    def bridge_names(self) -> set[str]:
        """The bridge's parameter names, from the file's header (no tensor is read)."""
        with safe_open(str(self.path / BRIDGE), framework="pt") as f:
            return set(f.keys())

    def optimizer(self) -> dict[str, Any] | None:
        p = self.path / OPTIMIZER
        return torch.load(p, weights_only=True) if p.exists() else None

    def rng(self, rank: int) -> dict[str, Any] | None:
        p = self.path / f"rng_rank{rank}.pt"
        return torch.load(p, weights_only=True) if p.exists() else None

    @property
    def deepspeed_dir(self) -> Path:
        return self.path / DEEPSPEED_DIR


def verify(path: Path) -> str | None:
    """None when the checkpoint folder is complete and intact, else why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"no readable manifest ({e.__class__.__name__})"
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, expected {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{name} fails its checksum"
    return None


def latest_valid(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged newer ones are skipped with a warning."""
    for step, path in _step_dirs(run_dir):
        problem = verify(path)
        if problem is None:
            return Checkpoint(path, step)
        log.warning("checkpoint %s is unusable (%s); trying the previous one", path, problem)
    return None
