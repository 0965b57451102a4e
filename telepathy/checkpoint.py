"""Atomic, verifiable training checkpoints: write, find the newest good one, prune.

A checkpoint folder (telepathy.rundir.StepDir) holds the full bridge weights as safetensors (gathered from
any backend, so they are backend-independent), the full AdamW state keyed by parameter name (plain, DDP and
FSDP; portable across those), DeepSpeed's own ZeRO-partitioned state (DeepSpeed only: same backend and
world size to resume it), the step, sampler position, LR scheduler, backend and world size, each rank's
python / numpy / torch / CUDA generator states, and last a manifest with the sha256 and size of every file.

Every rank writes its files into the folder's temporary twin, rank 0 then fsyncs and checksums them, writes
the manifest and renames the folder into place, so a reader sees a whole checkpoint or none. A write killed
half-way leaves only that twin: never read, removed by the next save of its step or the next resume.
`latest_valid` re-hashes and falls back to the previous checkpoint when the newest is damaged.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from telepathy import faults
from telepathy.errors import UserError
from telepathy.files import atomic_write_json, disk_full, free_bytes, fsync_dir, no_space, sha256_file
from telepathy.rundir import RunDir, StepDir

log = logging.getLogger(__name__)


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


def save(
    run_dir: RunDir,
    step: int,
    *,
    bridge: dict[str, torch.Tensor] | None,
    optimizer: dict[str, Any] | None,
    state: dict[str, Any] | None,
    keep: int,
    write_rank_files: Callable[[StepDir], None] | None = None,
) -> StepDir:
    """Collective: every rank calls it. `bridge`/`optimizer`/`state` are used on rank 0 (None elsewhere);
    `write_rank_files(folder)` runs on every rank for backend-sharded state (DeepSpeed).

    Out of space (checked before writing, recognised if a write fails anyway): every rank raises the same
    one-line UserError, the half-written folder is removed and the previous checkpoint stays the newest."""
    rank = _rank()
    final = run_dir.step(step)
    tmp = StepDir(final.tmp)
    full, need = False, 0
    if rank == 0:
        assert bridge is not None and state is not None
        shutil.rmtree(tmp.path, ignore_errors=True)  # a write that died half-way
        need = _bytes_needed(bridge, optimizer)
        full = free_bytes(run_dir.checkpoints) < need or _full(lambda: tmp.path.mkdir(parents=True), run_dir, need)
    _agree(full, run_dir, step, need)

    def rank0_files() -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in bridge.items()}, str(tmp.bridge))
        if faults.due("checkpoint-bridge", step, rank, run_dir):
            os.truncate(tmp.bridge, tmp.bridge.stat().st_size // 2)  # as a write killed half-way leaves it
            faults.kill("checkpoint-bridge", step, rank, run_dir)
        if optimizer is not None:
            torch.save(optimizer, tmp.optimizer)
        tmp.state.write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True) + "\n")

    def own_files() -> None:
        torch.save(rng_state(), tmp.rng(rank))
        if write_rank_files is not None:
            write_rank_files(tmp)

    full = rank == 0 and _full(rank0_files, run_dir, need)
    full = _full(own_files, run_dir, need) or full  # on every rank regardless: DeepSpeed's save is collective
    _agree(full, run_dir, step, need)

    files: dict[str, dict[str, Any]] = {}

    def manifest() -> None:
        for p in sorted(q for q in tmp.path.rglob("*") if q.is_file()):
            _fsync(p)
            files[str(p.relative_to(tmp.path))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        faults.kill("checkpoint-manifest", step, rank, run_dir)
        atomic_write_json(tmp.manifest, {"step": step, "files": files})

    if rank == 0:
        full = _full(manifest, run_dir, need)
        if not full:
            faults.kill("checkpoint-rename", step, rank, run_dir)
            if final.path.exists():  # an unverifiable leftover of the same step (we resumed from before it)
                shutil.rmtree(final.path)
            os.rename(tmp.path, final.path)
            fsync_dir(final.path.parent)
            prune(run_dir, keep)
            log.info("checkpoint %s written (%d files)", final.path, len(files) + 1)
    _agree(full, run_dir, step, need)  # nobody moves on (or exits after preemption) before the checkpoint is in place
    return final


NO_SPACE_FIX = "free space there or move the run folder to a larger disk"
_SLACK = 64 * 1024  # file headers, pickling, state.json and the manifest: small next to the tensors


def _bytes_needed(bridge: dict[str, torch.Tensor], optimizer: dict[str, Any] | None) -> int:
    """What the checkpoint will take on disk (DeepSpeed's own shards aside): the tensors written, plus slack."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return _tensor_bytes(bridge) + _tensor_bytes(optimizer) + world * _tensor_bytes(rng_state()) + _SLACK


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _full(write: Callable[[], None], run_dir: RunDir, need: int) -> bool:
    """Run `write`; True instead of the exception when it failed for lack of space (any other error raises)."""
    try:
        write()
    except Exception as e:
        if not disk_full(e, run_dir.checkpoints, need):
            raise
        log.error(
            "checkpoint write failed for lack of space: %s", str(e)
        )  # str: a kept record holding e would keep its frames and their open files
        return True
    return False


def _agree(full: bool, run_dir: RunDir, step: int, need: int) -> None:
    """Collective, in place of a barrier: when any rank ran out of space, rank 0 removes the half-written folder
    and every rank raises the same one-line error, so none is left waiting in a barrier for one that left."""
    flags = [full]
    if dist.is_initialized():
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, full)
    if not any(flags):
        return
    box: list[str | None] = [None]
    if _rank() == 0:
        shutil.rmtree(run_dir.step(step).tmp, ignore_errors=True)
        box = [str(no_space(run_dir.checkpoints, f"checkpoint step {step}", need, NO_SPACE_FIX))]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    raise UserError(box[0])


def prune(run_dir: RunDir, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in run_dir.step_dirs()[keep:]:
        shutil.rmtree(old.path, ignore_errors=True)


def remove_partial(run_dir: RunDir) -> None:
    """Rank 0 at resume, before anyone writes: remove the temporary folders of writes that were killed (they
    are never read; one of a step that is not saved again would otherwise stay forever)."""
    for leftover in run_dir.partial_step_dirs():
        log.warning("removing the partial checkpoint %s (its write was interrupted)", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def discard_after(run_dir: RunDir, step: int) -> None:
    """Remove checkpoints newer than the one we resume from: they failed verification and would otherwise
    count towards `keep` and push out the good ones."""
    for newer in run_dir.step_dirs():
        if newer.step > step:
            log.warning("removing unusable checkpoint %s", newer.path)
            shutil.rmtree(newer.path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Checkpoint:
    dir: StepDir

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def step(self) -> int:
        return self.dir.step

    @property
    def state(self) -> dict[str, Any]:
        return json.loads(self.dir.state.read_text())

    def bridge(self) -> dict[str, torch.Tensor]:
        # safetensors maps the file into memory: copy, so the tensors never change with the file
        return {k: v.clone() for k, v in load_file(str(self.dir.bridge)).items()}

    def bridge_names(self) -> set[str]:
        """The bridge's parameter names, from the file's header (no tensor is read)."""
        with safe_open(str(self.dir.bridge), framework="pt") as f:
            return set(f.keys())

    def optimizer(self) -> dict[str, Any] | None:
        p = self.dir.optimizer
        return torch.load(p, weights_only=True) if p.exists() else None

    def rng(self, rank: int) -> dict[str, Any] | None:
        p = self.dir.rng(rank)
        return torch.load(p, weights_only=True) if p.exists() else None

    @property
    def deepspeed_dir(self) -> Path:
        return self.dir.deepspeed


def verify(folder: StepDir) -> str | None:
    """None when the checkpoint folder is complete and intact, else why not."""
    try:
        manifest = json.loads(folder.manifest.read_text())
    except (OSError, ValueError) as e:
        return f"no readable manifest ({e.__class__.__name__})"
    for name, meta in manifest["files"].items():
        f = folder.path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, expected {meta['bytes']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{name} fails its checksum"
    return None


def latest_valid(run_dir: RunDir) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged newer ones are skipped with a warning."""
    for folder in run_dir.step_dirs():
        problem = verify(folder)
        if problem is None:
            return Checkpoint(folder)
        log.warning("checkpoint %s is unusable (%s); trying the previous one", folder.path, problem)
    return None
