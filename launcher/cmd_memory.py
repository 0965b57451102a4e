"""`launch memory`: per-GPU memory of a pair's training step, and the micro-batch it allows.

    launch memory --pair P                       per backend: largest micro-batch that fits, accumulation
    launch memory --pair P --trace [--micro-batch B] [--backend fsdp]   trace the real step on fake tensors
    launch memory --pair P --measure             real steps on this machine's GPU -> a measured table row

Takes the same run settings as `launch` (one flag table): what it estimates, `launch` can start. The first
form is analytic (telepathy.memory, instant, no torch); --trace runs the project's step at full size on
fake CPU tensors (telepathy.trace, seconds to a minute); --measure needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.flags import add_layout_flags, add_model_flags, add_run_flags, request_from_args
from launcher.plan import DEFAULT_GLOBAL_BATCH, choose_batch, run_config
from launcher.profiles import load_profile
from launcher.table import TableRow, find_row, load_table, load_user_rows, save_user_rows
from telepathy import memory
from telepathy.config import BACKENDS
from telepathy.errors import UserError
from telepathy.registry import load_registry
from telepathy.shape import StepShape


def register(sub) -> None:
    p = sub.add_parser(
        "memory",
        help="per-GPU memory of a pair's step and the micro-batch it allows",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(handler=handle)
    add_model_flags(p)
    what = p.add_argument_group("what to compute")
    mode = what.add_mutually_exclusive_group()
    mode.add_argument(
        "--trace",
        action="store_true",
        help="trace the real step on fake tensors (at --micro-batch; default: the largest that fits)",
    )
    mode.add_argument("--measure", action="store_true", help="run real steps on this machine's GPU; write a table row")
    what.add_argument(
        "--quick",
        action="store_true",
        help="with --measure: only micro-batch 1 and the analytic limit, and write no table row (a smoke test)",
    )
    what.add_argument("--json", action="store_true", help="machine-readable output")
    add_layout_flags(p, gpus_default=None)
    add_run_flags(p)


@dataclass(frozen=True)
class _Request:
    shape: StepShape  # the step at the first backend asked for
    gpu_memory_gb: float
    backends: tuple[str, ...]
    micro_batch: int | None
    global_batch: int | None


def _request(args) -> _Request:
    req = request_from_args(args, mode="slurm")
    pair = load_registry().pair(req.pair, req.sender, req.receiver)
    profile = load_profile(req.cluster, req.profile_overrides)
    cfg = run_config(req, pair, Path("(not written)"), "memory")
    world = args.gpus or profile.gpus_per_node
    backends = (args.backend,) if args.backend else BACKENDS
    shape = StepShape.of(cfg, pair, world, backend=backends[0])
    return _Request(shape, profile.gpu_memory_gb, backends, args.micro_batch, args.global_batch)


def handle(args) -> int:
    if args.quick and not args.measure:
        raise UserError("--quick shortens --measure; add --measure, or drop --quick")
    req = _request(args)
    if args.measure:
        if args.backend not in (None, "ddp"):
            raise UserError("--measure runs real steps on this machine's one GPU (backend ddp); drop --backend")
        return _measure(req, as_json=args.json, quick=args.quick)
    if args.trace:
        return _show_trace(req, args.backend or "ddp", as_json=args.json)
    return _show_batches(req, as_json=args.json)


# --------------------------------------------------------------------------------------- batch choice


def batch_choice(shape: StepShape, gpu_memory_gb: float, global_batch: int | None, rows=None) -> dict[str, Any]:
    """The largest micro-batch that fits one GPU for `shape` and the accumulation that reaches the target
    global batch (the table row's effective batch, else the planner's default) on its world size."""
    pair = shape.pair
    if not memory.weights_fit(shape, gpu_memory_gb):
        return {
            "backend": shape.backend,
            "fits": 0,
            "why": f"frozen weights alone need {memory.frozen_weights_gib(shape):.1f} GiB per GPU",
        }
    fits = memory.max_micro_batch(shape, gpu_memory_gb)
    if fits < 1:
        return {"backend": shape.backend, "fits": 0, "why": "not even micro-batch 1 fits"}
    row = find_row(
        rows if rows is not None else load_table(),
        pair,
        seq_len=shape.seq_len,
        backend=shape.backend,
        gpu_memory_gb=gpu_memory_gb,
    )
    target = global_batch or (row.effective_batch if row else DEFAULT_GLOBAL_BATCH)
    micro, accum, glob = choose_batch(target, fits, shape.world_size)
    est = memory.estimate(shape, micro)
    out = {
        "backend": shape.backend,
        "fits": fits,
        "micro_batch": micro,
        "grad_accum": accum,
        "global_batch": glob,
        "target_global_batch": target,
        "estimate_gib": round(est.total_gib, 2),
        "peak_at": est.phase,
        "components": est.to_dict()["components"],
        "table_row": row.to_dict() if row else None,
    }
    if row:
        out["table_row_estimate_gib"] = round(memory.estimate(shape, row.micro_batch).total_gib, 2)
    return out


def _shapes(req: _Request) -> dict[str, StepShape | str]:
    """Each backend's step, or why it does not apply (e.g. fsdp on a single-model pair)."""
    out: dict[str, StepShape | str] = {}
    for backend in req.backends:
        try:
            out[backend] = req.shape.replace(backend=backend)
        except UserError as e:
            out[backend] = str(e).split(";")[0]
    return out


def _header(shape: StepShape, gpu_memory_gb: float) -> str:
    ckpt = ", activation checkpointing" if shape.activation_checkpointing else ""
    return (
        f"{shape.pair.name}: sender {shape.seq_len} tokens, K={shape.bridge.soft_tokens}, answer "
        f"{shape.answer_len}, {shape.attention}{ckpt}; "
        f"{shape.world_size} GPU(s) of {gpu_memory_gb:g} GB\n"
        f"usable per GPU: {memory.margin_text(gpu_memory_gb)}"
    )


def _show_batches(req: _Request, *, as_json: bool) -> int:
    rows = load_table()
    shapes = _shapes(req)
    choices = [
        batch_choice(s, req.gpu_memory_gb, req.global_batch, rows)
        if isinstance(s, StepShape)
        else {"backend": b, "fits": 0, "why": s}
        for b, s in shapes.items()
    ]
    at = {
        b: memory.estimate(s, req.micro_batch)
        for b, s in shapes.items()
        if isinstance(s, StepShape) and req.micro_batch is not None
    }
    if as_json:
        print(
            json.dumps(
                {
                    "pair": req.shape.pair.name,
                    "world_size": req.shape.world_size,
                    "gpu_memory_gb": req.gpu_memory_gb,
                    "usable_gib": round(memory.usable_gib(req.gpu_memory_gb), 2),
                    "safety_margin_gib": round(memory.safety_margin_gib(req.gpu_memory_gb), 2),
                    "knobs": req.shape.to_dict(),
                    "backends": choices,
                    "at_micro_batch": {b: e.to_dict() for b, e in at.items()},
                },
                indent=2,
            )
        )
        return 0
    print(_header(req.shape, req.gpu_memory_gb))
    world = req.shape.world_size
    print(
        f"{'backend':<10} {'fits':>5}  {'micro x accum x GPUs = global (target)':<40} {'GiB at micro':>12}  table row"
    )
    for c in choices:
        if c["fits"] < 1:
            print(f"{c['backend']:<10} {0:>5}  {c['why']}")
            continue
        split = f"{c['micro_batch']} x {c['grad_accum']} x {world} = {c['global_batch']} ({c['target_global_batch']})"
        row = c["table_row"]
        row_text = (
            f"micro {row['micro_batch']} ({row['provenance']}): {c['table_row_estimate_gib']:.1f} GiB"
            if row
            else "none"
        )
        print(f"{c['backend']:<10} {c['fits']:>5}  {split:<40} {c['estimate_gib']:>12.1f}  {row_text}")
    for backend, est in at.items():
        comps = ", ".join(f"{k} {v:.2f}" for k, v in est.components.items() if v)
        print(
            f"\n{backend} at micro-batch {req.micro_batch}: {est.total_gib:.2f} GiB per GPU, peak at "
            f"{est.phase} ({comps})"
        )
    return 0


# ------------------------------------------------------------------------------------------------ trace


def _show_trace(req: _Request, backend: str, *, as_json: bool) -> int:
    """Trace the micro-batch asked for (default: the largest the analytic estimate fits) beside the estimate."""
    memory.check_traceable(backend)  # before importing torch
    shape = req.shape.replace(backend=backend)
    micro_batch = req.micro_batch
    if micro_batch is None:
        choice = batch_choice(shape, req.gpu_memory_gb, None)
        if choice["fits"] < 1:
            raise UserError(f"{shape.pair.name} under {backend}: {choice['why']}; nothing to trace")
        micro_batch = choice["fits"]
        if not as_json:
            print(f"micro-batch {micro_batch}: the largest the analytic estimate fits (choose one with --micro-batch)")
    from telepathy.trace import trace  # noqa: PLC0415  (torch only here)

    say = (lambda _m: None) if as_json else (lambda m: print(m, flush=True))
    traced = shape.replace(attention="sdpa")  # what the trace runs on the CPU
    result = trace(traced, micro_batch, progress=say)
    est = memory.estimate(traced, micro_batch)
    diff = est.total_gib / result.peak_gib - 1
    if as_json:
        print(
            json.dumps(
                {
                    "pair": shape.pair.name,
                    "trace": result.to_dict(),
                    "estimate": est.to_dict(),
                    "relative_difference": round(diff, 4),
                },
                indent=2,
            )
        )
        return 0
    print(
        f"\n{shape.pair.name}, {backend} on {shape.world_size} GPU(s), micro-batch {micro_batch}, sender "
        f"{shape.seq_len} tokens (trace: {result.seconds:.0f} s on fake CPU tensors, SDPA)"
    )
    print(f"{'GiB per GPU':<16} {'trace':>9} {'analytic':>9}")
    for c in memory.COMPONENTS:
        t, a = result.components.get(c, 0.0), est.components.get(c, 0.0)
        if t or a:
            print(f"{c:<16} {t:>9.2f} {a:>9.2f}")
    print(
        f"{'peak':<16} {result.peak_gib:>9.2f} {est.total_gib:>9.2f}   ({diff:+.1%}; trace peak in {result.phase}, "
        f"analytic at {est.phase})"
    )
    if shape.attention != "sdpa":
        print(
            f"note: traced with SDPA; the analytic estimate for {shape.attention} is "
            f"{memory.estimate(shape, micro_batch).total_gib:.2f} GiB"
        )
    usable = memory.usable_gib(req.gpu_memory_gb)
    print(
        f"fits {req.gpu_memory_gb:g} GB with the margin: {'yes' if result.peak_gib <= usable else 'NO'} "
        f"(usable {usable:.1f} GiB)"
    )
    return 0


# ---------------------------------------------------------------------------------------------- measure


def _measure(req: _Request, *, as_json: bool, quick: bool = False) -> int:
    """Real steps on this GPU (telepathy.measure), then a measured row in the memory table (not when quick)."""
    from telepathy.measure import gpu_name, measure, require_gpu, versions  # noqa: PLC0415  (torch only here)

    require_gpu()
    shape = req.shape.replace(backend="ddp", world_size=1)
    say = (lambda _m: None) if as_json else (lambda m: print(m, flush=True))
    tries = measure(shape, req.gpu_memory_gb, say=say, quick=quick)
    if quick:
        print(json.dumps({"pair": shape.pair.name, "tries": tries}, indent=2) if as_json else "quick: no row written")
        return 0
    good = [t for t in tries if t["fits"]]
    if not good:
        raise UserError(
            f"{shape.pair.name}: not even micro-batch 1 fits this GPU with the safety margin; "
            "shorten --max-length or use --activation-checkpointing"
        )
    best, gpu, date = good[-1], gpu_name(), datetime.date.today().isoformat()
    rows = load_table()
    pair = shape.pair
    seed = next(
        (
            r
            for r in rows
            if r.matches(pair, seq_len=shape.seq_len, backend="ddp", gpu_memory_gb=req.gpu_memory_gb)
            and r.measured is None
        ),
        None,
    )
    target = req.global_batch or (seed.effective_batch if seed else DEFAULT_GLOBAL_BATCH)
    micro, accum, _ = choose_batch(target, best["micro_batch"], 1)
    row = TableRow(
        sender=pair.sender.arch_key,
        receiver=None if pair.single else pair.receiver.arch_key,
        micro_batch=micro,
        grad_accum=accum,
        effective_batch=micro * accum,
        gpu_memory_gb=req.gpu_memory_gb,
        seq_len=shape.seq_len,
        dtype="bf16",
        backend="ddp",
        provenance=f"measured on {gpu} {date}",
        measured={
            "gpu": gpu,
            "date": date,
            "versions": versions(),
            "peak_reserved_gib": best["reserved_gib"],
            "peak_allocated_gib": best["allocated_gib"],
            "estimate_gib": best["estimate_gib"],
            "largest_fitting_micro_batch": best["micro_batch"],
            "tries": tries,
        },
    )

    def same(r: TableRow) -> bool:
        return r.measured is not None and (r.sender, r.receiver, r.seq_len, r.backend, r.gpu_memory_gb) == (
            row.sender,
            row.receiver,
            row.seq_len,
            row.backend,
            row.gpu_memory_gb,
        )

    path = save_user_rows([r for r in load_user_rows() if not same(r)] + [row])
    if as_json:
        print(json.dumps({"row": row.to_dict(), "table": str(path)}, indent=2))
    else:
        print(
            f"wrote a measured row to {path}: {pair.name} micro-batch {micro} x accumulation {accum} "
            f"(largest that fits: {best['micro_batch']}, reserved {best['reserved_gib']:.1f} GiB, estimate "
            f"{best['estimate_gib']:.1f} GiB)"
        )
    return 0
