"""Plan = f(pair, GPUs, profile, backend, table, estimate): everything a submission needs, as plain data.

No I/O beyond reading configs, no torch. The same Plan is printed by --dry-run, written to the run
folder, and read back by the node entry, so what is shown is what runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.profiles import ClusterProfile
from launcher.table import TableRow, find_row, load_table
from telepathy import memory
from telepathy.config import RunConfig, TrainConfig, atomic_write_text
from telepathy.errors import UserError
from telepathy.registry import Pair

MODES = ("slurm", "local", "debug")
# Without a table row or --global-batch, keep the original's Table-1 batch (16 on one GPU).
DEFAULT_GLOBAL_BATCH = TrainConfig.micro_batch * TrainConfig.grad_accum


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    global_batch: int
    target_global_batch: int
    source: str  # "table", "estimate" or "flag"
    table_row: dict[str, Any] | None
    max_micro_batch_estimate: int  # largest micro-batch the analytic memory model fits
    notes: tuple[str, ...] = ()  # rounding and memory warnings, shown by --dry-run


@dataclass(frozen=True)
class Plan:
    run: RunConfig
    mode: str
    layout: Layout
    batch: BatchPlan
    profile: ClusterProfile
    memory: dict[str, Any]  # analytic estimate at the chosen micro-batch
    device: str  # "cuda", "cpu", or "auto" (local modes: the worker decides)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run.to_dict(), "mode": self.mode, "device": self.device,
            "layout": {**dataclasses.asdict(self.layout), "world_size": self.layout.world_size},
            "batch": {**dataclasses.asdict(self.batch), "notes": list(self.batch.notes)},
            "profile": self.profile.to_dict(), "memory": self.memory,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        layout = {k: v for k, v in d["layout"].items() if k != "world_size"}
        return cls(run=RunConfig.from_dict(d["run"]), mode=d["mode"], device=d["device"], layout=Layout(**layout),
                   batch=BatchPlan(**{**d["batch"], "notes": tuple(d["batch"]["notes"])}),
                   profile=ClusterProfile.from_dict(d["profile"]), memory=d["memory"])

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text()))


def layout_for(gpus: int, profile: ClusterProfile, mode: str) -> Layout:
    if gpus < 1:
        raise UserError(f"--gpus must be a positive whole number (got {gpus})")
    if mode == "debug":
        return Layout(1, 1)
    if mode == "local" or gpus <= profile.gpus_per_node:
        return Layout(1, gpus)
    g = profile.gpus_per_node
    if gpus % g:
        raise UserError(f"--gpus {gpus} cannot be laid out on {g}-GPU nodes of profile '{profile.name}'; "
                        f"use 1-{g} GPUs on one node or a multiple of {g} ({g * 2}, {g * 3}, ...)")
    return Layout(gpus // g, g)


def choose_batch(target: int, max_micro: int, world: int) -> tuple[int, int, int]:
    """(micro, accum, global): the fewest accumulation steps with micro <= max_micro that reach at least
    `target` samples per optimizer step across `world` GPUs."""
    per_gpu = max(1, math.ceil(target / world))
    accum = math.ceil(per_gpu / max_micro)
    micro = math.ceil(per_gpu / accum)
    return micro, accum, micro * accum * world


_MEMO: dict = {}


def _memo(fn, pair: Pair, **knobs):
    """Memory-model calls repeat across sweep tasks that differ only in seed or lr: compute each once."""
    key = (fn.__name__, pair.sender.source, pair.receiver.source, tuple(sorted(knobs.items())))
    if key not in _MEMO:
        _MEMO[key] = fn(pair, **knobs)
    return _MEMO[key]


def make_plan(pair: Pair, run: RunConfig, *, gpus: int, profile: ClusterProfile, mode: str,
              global_batch: int | None = None, micro_batch: int | None = None,
              table: list[TableRow] | None = None) -> Plan:
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'; use one of {', '.join(MODES)}")
    layout = layout_for(gpus, profile, mode)
    world = layout.world_size
    knobs = dict(backend=run.backend, world_size=world, seq_len=run.data.max_length, answer_len=run.data.answer_length,
                 bridge=run.bridge, zero_stage=run.train.zero_stage, bridge_dtype=run.train.bridge_dtype,
                 activation_checkpointing=run.train.activation_checkpointing, sender_cache=run.train.sender_cache)
    gpu_gb = profile.gpu_memory_gb
    if not _memo(memory.weights_fit, pair, backend=run.backend, world_size=world, gpu_memory_gb=gpu_gb,
                 bridge=run.bridge, sender_cache=run.train.sender_cache):
        w = _memo(memory.estimate, pair, micro_batch=1, **knobs).components["frozen_weights"]
        fix = "use --backend fsdp with more GPUs" if run.backend != "fsdp" else "use more GPUs"
        raise UserError(f"{pair.name}: frozen weights alone need {w:.1f} GiB per GPU under {run.backend} on {world} GPU(s), "
                        f"more than the {gpu_gb:g} GB GPU; {fix}, or a GPU with more memory")
    fits = _memo(memory.max_micro_batch, pair, gpu_memory_gb=gpu_gb, **knobs)
    if fits < 1:
        raise UserError(f"{pair.name}: not even micro-batch 1 fits a {gpu_gb:g} GB GPU under {run.backend} at sequence "
                        f"length {run.data.max_length}; shorten --max-length, use --backend fsdp, or more GPUs")
    rows = load_table() if table is None else table
    row = find_row(rows, pair, seq_len=run.data.max_length, backend=run.backend, gpu_memory_gb=gpu_gb)
    notes: list[str] = []
    if micro_batch is not None:
        source, max_micro = "flag", micro_batch
        if micro_batch > fits:
            notes.append(f"--micro-batch {micro_batch} is above the {fits} the memory model fits on {gpu_gb:g} GB: expect OOM")
    elif row is not None:
        source, max_micro = "table", row.micro_batch
        # Judge the row at its own sequence length: that is the claim the table makes.
        at_row = {**knobs, "seq_len": row.seq_len}
        est_row = _memo(memory.estimate, pair, micro_batch=row.micro_batch, **at_row).total_gib
        fits_row = _memo(memory.max_micro_batch, pair, gpu_memory_gb=gpu_gb, **at_row)
        if row.micro_batch > fits_row:
            notes.append(f"table row micro-batch {row.micro_batch} does not fit by the memory model at seq {row.seq_len} "
                         f"({est_row:.1f} GiB; largest {fits_row})")
        if est_row < 0.5 * memory.gpu_gib(gpu_gb):
            notes.append(f"table row (micro-batch {row.micro_batch} at seq {row.seq_len}) uses {est_row:.1f} GiB of the "
                         f"{gpu_gb:g} GB GPU by the memory model, under half: it fits micro-batch {fits_row} there")
    else:
        source, max_micro = "estimate", fits
        notes.append(f"no table row for {pair.name} at seq {run.data.max_length}, {run.backend}, {gpu_gb:g} GB: "
                     f"micro-batch from the memory model")
    target = global_batch or (row.effective_batch if row is not None and source == "table" else DEFAULT_GLOBAL_BATCH)
    if global_batch is not None and global_batch < 1:
        raise UserError(f"--global-batch must be >= 1 (got {global_batch})")
    micro, accum, glob = choose_batch(target, max_micro, world)
    if glob != target:
        why = (f"{world} GPUs x at least 1 sample" if glob > target and micro == 1 and accum == 1
               else f"micro-batch {micro} x accumulation {accum} x {world} GPUs")
        notes.append(f"global batch {glob} instead of the target {target} ({why})")
    est = _memo(memory.estimate, pair, micro_batch=micro, **knobs)
    batch = BatchPlan(micro, accum, glob, target, source, row.to_dict() if row else None, fits, tuple(notes))
    run = run.replace(train={"micro_batch": micro, "grad_accum": accum}, predicted_peak_gib=round(est.total_gib, 3))
    device = profile.device if mode == "slurm" else "auto"
    return Plan(run=run, mode=mode, layout=layout, batch=batch, profile=profile, memory=est.to_dict(), device=device)


def torchrun_command(plan: Plan, *, config_path: str, node_rank: int | str = 0, rdzv_endpoint: str = "",
                     rdzv_id: str = "") -> list[str]:
    """The torchrun argv for one node. One node: --standalone. Several: c10d rendezvous on the first node."""
    lay = plan.layout
    argv = ["torchrun"]
    if lay.nodes == 1:
        argv += ["--standalone", f"--nnodes=1"]
    else:
        if not rdzv_endpoint:
            raise ValueError("multi-node torchrun needs the first node's address as rdzv_endpoint")
        argv += [f"--nnodes={lay.nodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    return argv + [f"--nproc_per_node={lay.gpus_per_node}", "-m", "telepathy.train", "--config", config_path]
