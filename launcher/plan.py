"""Plan = f(pair, GPUs, profile, backend, table, estimate): everything a submission needs, as plain data.

No I/O beyond reading configs, no torch. The same Plan is printed by --dry-run, written to the run
folder, and read back by the node entry, so what is shown is what runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.flags import LaunchRequest
from launcher.profiles import ClusterProfile, load_profile
from launcher.runs import check_name, default_name, runs_root
from launcher.sweep import PAIR_KEY, expand_sweep
from launcher.table import TableRow, find_row, load_table
from telepathy import memory
from telepathy.config import DataConfig, RunConfig, TrainConfig
from telepathy.data import load_spec
from telepathy.errors import UserError
from telepathy.files import atomic_write_json, read_json
from telepathy.registry import Pair, load_registry
from telepathy.shape import StepShape

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
            "run": self.run.to_dict(),
            "mode": self.mode,
            "device": self.device,
            "layout": {**dataclasses.asdict(self.layout), "world_size": self.layout.world_size},
            "batch": {**dataclasses.asdict(self.batch), "notes": list(self.batch.notes)},
            "profile": self.profile.to_dict(),
            "memory": self.memory,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        layout = {k: v for k, v in d["layout"].items() if k != "world_size"}
        return cls(
            run=RunConfig.from_dict(d["run"]),
            mode=d["mode"],
            device=d["device"],
            layout=Layout(**layout),
            batch=BatchPlan(**{**d["batch"], "notes": tuple(d["batch"]["notes"])}),
            profile=ClusterProfile.from_dict(d["profile"]),
            memory=d["memory"],
        )

    @property
    def shape(self) -> StepShape:
        """The step this plan trains, per GPU."""
        return StepShape.of(
            self.run, load_registry().pair(sender=self.run.sender, receiver=self.run.receiver), self.layout.world_size
        )

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    def write(self) -> None:
        """The run folder's config.json (what the worker reads) and plan.json (what the launcher decided)."""
        self.run.save(self.run.dir.config)
        self.save(self.run.dir.plan)

    @property
    def cache_group(self) -> tuple | None:
        """What fixes this run's sender cache entry (tasks with the same group share one), None without one."""
        r = self.run
        if not r.train.sender_cache:
            return None
        return (
            r.sender,
            r.bridge.source_layer,
            r.data.task,
            r.data.max_length,
            r.data.train_samples,
            r.train.precision,
        )

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        d = read_json(path, "plan")
        if d is None:
            raise UserError(f"plan {path} not found; is this a run folder `launch` wrote?")
        return cls.from_dict(d)


def local_gpus() -> int:
    """The GPUs this machine shows a process (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`), torch-free; 0: none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def layout_for(gpus: int, profile: ClusterProfile, mode: str) -> Layout:
    if gpus < 1:
        raise UserError(f"--gpus must be a positive whole number (got {gpus})")
    if mode == "debug":
        return Layout(1, 1)
    if mode == "local":
        have = local_gpus()
        if have and gpus > have:  # each rank takes cuda:LOCAL_RANK; without GPUs the ranks run on the CPU
            raise UserError(f"--local --gpus {gpus} needs {gpus} GPUs and this machine shows {have}; use --gpus {have}")
        return Layout(1, gpus)
    if gpus <= profile.gpus_per_node:
        return Layout(1, gpus)
    g = profile.gpus_per_node
    if gpus % g:
        raise UserError(
            f"--gpus {gpus} cannot be laid out on {g}-GPU nodes of profile '{profile.name}'; "
            f"use 1-{g} GPUs on one node or a multiple of {g} ({g * 2}, {g * 3}, ...)"
        )
    if profile.max_nodes is not None and gpus // g > profile.max_nodes:
        raise UserError(
            f"--gpus {gpus} needs {gpus // g} nodes of {g} GPUs and profile '{profile.name}' has at most "
            f"{profile.max_nodes} (max_nodes); use at most --gpus {profile.max_nodes * g}"
        )
    return Layout(gpus // g, g)


# A layout whose one-sample-per-GPU batch exceeds the target this many times over is refused at planning:
# training at 512 instead of 12 changes the optimisation, not just the speed.
MAX_BATCH_OVER_TARGET = 4


def _most_gpus(limit: int, profile: ClusterProfile, mode: str) -> int:
    """The largest GPU count at or below `limit` that lays out (whole nodes beyond one)."""
    g = profile.gpus_per_node
    return limit if mode != "slurm" or limit <= g else limit // g * g


def choose_batch(target: int, max_micro: int, world: int) -> tuple[int, int, int]:
    """(micro, accum, global): the fewest accumulation steps with micro <= max_micro that reach at least
    `target` samples per optimizer step across `world` GPUs."""
    per_gpu = max(1, math.ceil(target / world))
    accum = math.ceil(per_gpu / max_micro)
    micro = math.ceil(per_gpu / accum)
    return micro, accum, micro * accum * world


_MEMO: dict = {}


def _memo(fn, shape: StepShape, *args):
    """Memory-model calls repeat across sweep tasks that differ only in seed or lr: compute each once."""
    key = (fn.__name__, repr(shape), args)
    if key not in _MEMO:
        _MEMO[key] = fn(shape, *args)
    return _MEMO[key]


def make_plan(
    pair: Pair,
    run: RunConfig,
    *,
    gpus: int,
    profile: ClusterProfile,
    mode: str,
    global_batch: int | None = None,
    micro_batch: int | None = None,
    table: list[TableRow] | None = None,
) -> Plan:
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}'; use one of {', '.join(MODES)}")
    layout = layout_for(gpus, profile, mode)
    world = layout.world_size
    shape = StepShape.of(run, pair, world)
    gpu_gb = profile.gpu_memory_gb
    if not _memo(memory.weights_fit, shape, gpu_gb):
        w = _memo(memory.frozen_weights_gib, shape)
        fix = "use --backend fsdp with more GPUs" if run.backend != "fsdp" else "use more GPUs"
        raise UserError(
            f"{pair.name}: frozen weights alone need {w:.1f} GiB per GPU under {run.backend} on {world} GPU(s), "
            f"more than the {gpu_gb:g} GB GPU; {fix}, or a GPU with more memory"
        )
    fits = _memo(memory.max_micro_batch, shape, gpu_gb)
    if fits < 1:
        raise UserError(
            f"{pair.name}: not even micro-batch 1 fits a {gpu_gb:g} GB GPU under {run.backend} at sequence "
            f"length {run.data.max_length}; shorten --max-length, use --backend fsdp, or more GPUs"
        )
    rows = load_table() if table is None else table
    row = find_row(rows, pair, seq_len=run.data.max_length, backend=run.backend, gpu_memory_gb=gpu_gb)
    notes: list[str] = []
    if micro_batch is not None:
        source, max_micro = "flag", micro_batch
        if micro_batch > fits:
            notes.append(
                f"--micro-batch {micro_batch} is above the {fits} the memory model fits on {gpu_gb:g} GB: expect OOM"
            )
    elif row is not None:
        source, max_micro = "table", row.micro_batch
        # Judge the row at its own sequence length: that is the claim the table makes.
        at_row = shape.replace(seq_len=row.seq_len)
        est_row = _memo(memory.estimate, at_row, row.micro_batch).total_gib
        fits_row = _memo(memory.max_micro_batch, at_row, gpu_gb)
        if row.micro_batch > fits_row:
            notes.append(
                f"table row micro-batch {row.micro_batch} does not fit by the memory model at seq {row.seq_len} "
                f"({est_row:.1f} GiB; largest {fits_row})"
            )
        if est_row < 0.5 * memory.gpu_gib(gpu_gb):
            notes.append(
                f"table row (micro-batch {row.micro_batch} at seq {row.seq_len}) uses {est_row:.1f} GiB of the "
                f"{gpu_gb:g} GB GPU by the memory model, under half: it fits micro-batch {fits_row} there"
            )
    else:
        source, max_micro = "estimate", fits
        notes.append(
            f"no table row for {pair.name} at seq {run.data.max_length}, {run.backend}, {gpu_gb:g} GB: "
            f"micro-batch from the memory model"
        )
    target = global_batch or (row.effective_batch if row is not None and source == "table" else DEFAULT_GLOBAL_BATCH)
    micro, accum, glob = choose_batch(target, max_micro, world)
    if glob > MAX_BATCH_OVER_TARGET * target:  # rounding alone stays below: only more GPUs than samples
        raise UserError(
            f"--gpus {world} makes the global batch at least {glob} (1 sample per GPU), over "
            f"{MAX_BATCH_OVER_TARGET}x the target {target}: a different experiment; use at most --gpus "
            f"{_most_gpus(MAX_BATCH_OVER_TARGET * target, profile, mode)}, or ask for it with --global-batch {glob}"
        )
    if glob != target:
        why = (
            f"{world} GPUs x at least 1 sample"
            if glob > target and micro == 1 and accum == 1
            else f"micro-batch {micro} x accumulation {accum} x {world} GPUs"
        )
        notes.append(f"global batch {glob} instead of the target {target} ({why})")
    est = _memo(memory.estimate, shape, micro)
    batch = BatchPlan(micro, accum, glob, target, source, row.to_dict() if row else None, fits, tuple(notes))
    run = run.replace(train={"micro_batch": micro, "grad_accum": accum}, predicted_peak_gib=round(est.total_gib, 3))
    device = profile.device if mode == "slurm" else "auto"
    return Plan(run=run, mode=mode, layout=layout, batch=batch, profile=profile, memory=est.to_dict(), device=device)


# ------------------------------------------------------------------------------------ from a request


@functools.lru_cache(maxsize=64)
def task_defaults(task: str) -> dict[str, int]:
    """Fail at planning, not on a compute node: the task must exist. Its spec's usual sender length
    (e.g. AG News 256) and answer length (Banking77's long intent names) are the defaults; data files use
    DataConfig's."""
    if task.endswith((".jsonl", ".csv")):
        if not Path(task).is_file():
            raise UserError(f"task file {task} not found; pass an existing .jsonl/.csv file or a task name")
        return {}
    spec = load_spec(task)
    return {k: v for k, v in (("max_length", spec.max_length), ("answer_length", spec.answer_length)) if v}


def run_config(
    request: LaunchRequest, pair: Pair, run_dir: Path, name: str, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """The RunConfig a request (plus one sweep task's overrides) asks for; defaults from telepathy/config.py."""
    sections = {k: dict(v) if isinstance(v, dict) else v for k, v in request.overrides.items()}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            sections.setdefault(key, {}).update(value)
        elif key != PAIR_KEY:  # a top-level field (method); the pair is resolved by the caller
            sections[key] = value
    if request.mode == "debug":  # a few steps to see everything run end to end
        sections.setdefault("train", {}).setdefault("steps", 20)
        sections.setdefault("data", {}).setdefault("eval_samples", 32)
    cfg = RunConfig(
        sender=pair.sender.source if pair.sender.path else pair.sender.alias,
        receiver=pair.receiver.source if pair.receiver.path else pair.receiver.alias,
        run_dir=str(run_dir),
        backend=request.backend,
        name=name,
    ).replace(**sections)
    defaults = {k: v for k, v in task_defaults(cfg.data.task).items() if k not in sections.get("data", {})}
    return cfg.replace(data=defaults) if defaults else cfg


def build_plans(request: LaunchRequest) -> tuple[list[Plan], Path | None]:
    """One plan, or one per sweep task (sharing a sweep folder, returned second)."""
    reg = load_registry()
    profile = load_profile(request.cluster, request.profile_overrides)
    root = runs_root(request.runs_dir)
    table = load_table()  # once, not per sweep task

    def plan_for(pair: Pair, run_dir: Path, name: str, overrides: dict | None = None) -> Plan:
        cfg = run_config(request, pair, run_dir, name, overrides)
        return make_plan(
            pair,
            cfg,
            gpus=request.gpus,
            profile=profile,
            mode=request.mode,
            global_batch=request.global_batch,
            micro_batch=request.micro_batch,
            table=table,
        )

    pair = reg.pair(request.pair, request.sender, request.receiver)
    task = request.overrides.get("data", {}).get("task", DataConfig.task)
    name = check_name(request.name) if request.name is not None else default_name(pair.name, task)
    if root.exists() and not root.is_dir():
        raise UserError(f"runs folder {root} (--runs-dir or TELEPATHY_RUNS) is a file; pass a folder")
    if not request.sweep:
        return [plan_for(pair, root / name, name)], None
    sweep_dir = root / name
    plans = []
    for task_name, spec in expand_sweep(list(request.sweep)):
        task_pair = reg.pair(spec.pop(PAIR_KEY)) if PAIR_KEY in spec else pair
        plans.append(plan_for(task_pair, sweep_dir / task_name, f"{name}.{task_name}", spec))
    return plans, sweep_dir


def torchrun_command(
    plan: Plan,
    *,
    config_path: str,
    node_rank: int | str = 0,
    rdzv_endpoint: str = "",
    rdzv_id: str = "",
    cache_only: bool = False,
) -> list[str]:
    """The torchrun argv for one node. One node: --standalone. Several: c10d rendezvous on the first node."""
    lay = plan.layout
    argv = ["torchrun"]
    if lay.nodes == 1:
        argv += ["--standalone", "--nnodes=1"]
    else:
        if not rdzv_endpoint:
            raise ValueError("multi-node torchrun needs the first node's address as rdzv_endpoint")
        argv += [
            f"--nnodes={lay.nodes}",
            f"--node_rank={node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rdzv_endpoint}",
            f"--rdzv_id={rdzv_id}",
        ]
    if plan.profile.max_restarts:
        argv.append(f"--max-restarts={plan.profile.max_restarts}")
    worker = ["-m", "telepathy.train", "--config", config_path, *(["--sender-cache-only"] if cache_only else [])]
    return argv + [f"--nproc_per_node={lay.gpus_per_node}", *worker]
