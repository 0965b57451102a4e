"""`launch memory`: per-GPU memory of a pair's training step, and the micro-batch it allows.

    launch memory --pair P                       per backend: largest micro-batch that fits, accumulation
    launch memory --pair P --trace [--micro-batch B] [--backend fsdp]   trace the real step on fake tensors
    launch memory --pair P --measure             real steps on this machine's GPU -> a measured table row

The first form is analytic (telepathy.memory, instant, no torch); --trace runs the project's step at full
size on fake CPU tensors (telepathy.trace, seconds to a minute); --measure needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from launcher.cmd_run import positive_int
from launcher.plan import DEFAULT_GLOBAL_BATCH, choose_batch
from launcher.profiles import OVERRIDABLE, add_profile_flags, load_profile
from launcher.table import find_row, load_table
from telepathy import memory
from telepathy.config import BACKENDS, BridgeConfig, DataConfig, TrainConfig
from telepathy.errors import UserError
from telepathy.registry import Pair, load_registry


def register(sub) -> None:
    p = sub.add_parser("memory", help="per-GPU memory of a pair's step and the micro-batch it allows",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=handle)
    who = p.add_argument_group("models")
    who.add_argument("--pair", help="SENDER-RECEIVER aliases, e.g. llama8b-mistral7b (one alias = single-model)")
    who.add_argument("--sender")
    who.add_argument("--receiver")
    what = p.add_argument_group("what to compute")
    mode = what.add_mutually_exclusive_group()
    mode.add_argument("--trace", action="store_true",
                      help="trace the real step on fake tensors (at --micro-batch; default: the largest that fits)")
    mode.add_argument("--measure", action="store_true", help="run real steps on this machine's GPU; write a table row")
    what.add_argument("--micro-batch", type=positive_int, help="per-GPU micro-batch to estimate or trace")
    what.add_argument("--backend", choices=BACKENDS, help="one backend (default: all; --trace: ddp)")
    what.add_argument("--gpus", type=positive_int, help="world size (default: one node of the profile)")
    what.add_argument("--global-batch", type=positive_int, help="target samples per optimizer step (default: the table's)")
    what.add_argument("--json", action="store_true", help="machine-readable output")
    step = p.add_argument_group("step shape (defaults: telepathy/config.py)")
    step.add_argument("--max-length", type=positive_int, default=DataConfig.max_length, help="sender tokens")
    step.add_argument("--answer-length", type=positive_int, default=DataConfig.answer_length)
    step.add_argument("--soft-tokens", type=positive_int, default=BridgeConfig.soft_tokens)
    step.add_argument("--depth", type=positive_int, default=BridgeConfig.depth)
    step.add_argument("--heads", type=positive_int, default=BridgeConfig.heads)
    step.add_argument("--source-layer", type=int, default=BridgeConfig.source_layer)
    step.add_argument("--bridge-dtype", choices=("bfloat16", "float32"), default=TrainConfig.bridge_dtype)
    step.add_argument("--zero-stage", type=int, choices=(2, 3), default=TrainConfig.zero_stage)
    step.add_argument("--attention", choices=memory.ATTENTIONS, default="sdpa",
                      help="the GPU run's kernel, for the analytic estimate (the trace runs SDPA)")
    step.add_argument("--activation-checkpointing", action="store_true")
    step.add_argument("--sender-cache", action="store_true", help="batches carry cached sender states (no sender)")
    add_profile_flags(p)


@dataclass(frozen=True)
class _Request:
    pair: Pair
    world: int
    gpu_memory_gb: float
    knobs: dict[str, Any]  # memory.estimate's knobs without backend, world_size, micro_batch


def _request(args) -> _Request:
    pair = load_registry().pair(args.pair, args.sender, args.receiver)
    profile = load_profile(args.cluster, {k: getattr(args, f"profile_{k}") for k in OVERRIDABLE})
    bridge = BridgeConfig(soft_tokens=args.soft_tokens, depth=args.depth, heads=args.heads, source_layer=args.source_layer)
    knobs = dict(seq_len=args.max_length, answer_len=args.answer_length, bridge=bridge, zero_stage=args.zero_stage,
                 attention=args.attention, activation_checkpointing=args.activation_checkpointing,
                 bridge_dtype=args.bridge_dtype, sender_cache=args.sender_cache)
    return _Request(pair, args.gpus or profile.gpus_per_node, profile.gpu_memory_gb, knobs)


def handle(args) -> int:
    req = _request(args)
    if args.measure:
        if args.backend not in (None, "ddp"):
            raise UserError("--measure runs real steps on this machine's one GPU (backend ddp); drop --backend")
        from telepathy.measure import measure_command  # noqa: PLC0415 (torch only here)

        return measure_command(req.pair, knobs=req.knobs, gpu_memory_gb=req.gpu_memory_gb,
                               global_batch=args.global_batch, as_json=args.json)
    if args.trace:
        return _show_trace(req, args.backend or "ddp", args.micro_batch, as_json=args.json)
    return _show_batches(req, [args.backend] if args.backend else list(BACKENDS), args.micro_batch,
                         args.global_batch, as_json=args.json)


# --------------------------------------------------------------------------------------- batch choice


def batch_choice(req: _Request, backend: str, global_batch: int | None, rows=None) -> dict[str, Any]:
    """The largest micro-batch that fits one GPU under `backend` and the accumulation that reaches the
    target global batch (the table row's effective batch, else the planner's default) on `req.world` GPUs."""
    knobs = dict(req.knobs, backend=backend, world_size=req.world)
    pair, gb = req.pair, req.gpu_memory_gb
    try:
        if not memory.weights_fit(pair, backend=backend, world_size=req.world, gpu_memory_gb=gb,
                                  bridge=knobs["bridge"], sender_cache=knobs["sender_cache"]):
            w = memory.estimate(pair, micro_batch=0, **knobs).components["frozen_weights"]
            return {"backend": backend, "fits": 0, "why": f"frozen weights alone need {w:.1f} GiB per GPU"}
        fits = memory.max_micro_batch(pair, gpu_memory_gb=gb, **knobs)
    except UserError as e:  # e.g. fsdp cannot shard a single-model pair
        return {"backend": backend, "fits": 0, "why": str(e).split(";")[0]}
    if fits < 1:
        return {"backend": backend, "fits": 0, "why": "not even micro-batch 1 fits"}
    row = find_row(rows if rows is not None else load_table(), pair, seq_len=req.knobs["seq_len"], backend=backend,
                   gpu_memory_gb=gb)
    target = global_batch or (row.effective_batch if row else DEFAULT_GLOBAL_BATCH)
    micro, accum, glob = choose_batch(target, fits, req.world)
    est = memory.estimate(pair, micro_batch=micro, **knobs)
    out = {"backend": backend, "fits": fits, "micro_batch": micro, "grad_accum": accum, "global_batch": glob,
           "target_global_batch": target, "estimate_gib": round(est.total_gib, 2), "peak_at": est.phase,
           "components": est.to_dict()["components"], "table_row": row.to_dict() if row else None}
    if row:
        out["table_row_estimate_gib"] = round(memory.estimate(pair, micro_batch=row.micro_batch, **knobs).total_gib, 2)
    return out


def _header(req: _Request) -> str:
    k = req.knobs
    return (f"{req.pair.name}: sender {k['seq_len']} tokens, K={k['bridge'].soft_tokens}, answer {k['answer_len']}, "
            f"{k['attention']}{', activation checkpointing' if k['activation_checkpointing'] else ''}; "
            f"{req.world} GPU(s) of {req.gpu_memory_gb:g} GB\n"
            f"usable per GPU: {memory.margin_text(req.gpu_memory_gb)}")


def _show_batches(req: _Request, backends: list[str], micro_batch: int | None, global_batch: int | None,
                  *, as_json: bool) -> int:
    rows = load_table()
    choices = [batch_choice(req, b, global_batch, rows) for b in backends]
    at = {}  # the estimate at --micro-batch, where the backend applies
    for backend in backends if micro_batch is not None else []:
        try:
            at[backend] = memory.estimate(req.pair, micro_batch=micro_batch, backend=backend, world_size=req.world,
                                          **req.knobs)
        except UserError:
            pass
    if as_json:
        print(json.dumps({"pair": req.pair.name, "world_size": req.world, "gpu_memory_gb": req.gpu_memory_gb,
                          "usable_gib": round(memory.usable_gib(req.gpu_memory_gb), 2),
                          "safety_margin_gib": round(memory.safety_margin_gib(req.gpu_memory_gb), 2),
                          "knobs": {**req.knobs, "bridge": vars(req.knobs["bridge"])},
                          "backends": choices,
                          "at_micro_batch": {b: e.to_dict() for b, e in at.items()}}, indent=2))
        return 0
    print(_header(req))
    print(f"{'backend':<10} {'fits':>5}  {'micro x accum x GPUs = global (target)':<40} {'GiB at micro':>12}  table row")
    for c in choices:
        if c["fits"] < 1:
            print(f"{c['backend']:<10} {0:>5}  {c['why']}")
            continue
        split = f"{c['micro_batch']} x {c['grad_accum']} x {req.world} = {c['global_batch']} ({c['target_global_batch']})"
        row = c["table_row"]
        row_text = (f"micro {row['micro_batch']} ({row['provenance']}): {c['table_row_estimate_gib']:.1f} GiB"
                    if row else "none")
        print(f"{c['backend']:<10} {c['fits']:>5}  {split:<40} {c['estimate_gib']:>12.1f}  {row_text}")
    for backend, est in at.items():
        comps = ", ".join(f"{k} {v:.2f}" for k, v in est.components.items() if v)
        print(f"\n{backend} at micro-batch {est.knobs['micro_batch']}: {est.total_gib:.2f} GiB per GPU, peak at "
              f"{est.phase} ({comps})")
    return 0


# ------------------------------------------------------------------------------------------------ trace


def _show_trace(req: _Request, backend: str, micro_batch: int | None, *, as_json: bool) -> int:
    """Trace `micro_batch` (default: the largest the analytic estimate fits) and show it beside the estimate."""
    memory.check_traceable(backend)  # before importing torch
    if micro_batch is None:
        choice = batch_choice(req, backend, None)
        if choice["fits"] < 1:
            raise UserError(f"{req.pair.name} under {backend}: {choice['why']}; nothing to trace")
        micro_batch = choice["fits"]
        if not as_json:
            print(f"micro-batch {micro_batch}: the largest the analytic estimate fits (choose one with --micro-batch)")
    from telepathy.trace import trace  # noqa: PLC0415 (torch only here)

    k = {key: v for key, v in req.knobs.items() if key not in ("attention", "zero_stage")}
    say = (lambda _m: None) if as_json else (lambda m: print(m, flush=True))
    result = trace(req.pair, backend=backend, world_size=req.world, micro_batch=micro_batch, progress=say, **k)

    def estimate(attention: str):
        return memory.estimate(req.pair, backend=backend, world_size=req.world, micro_batch=micro_batch,
                               attention=attention, **k)

    est = estimate("sdpa")  # what the trace runs
    diff = est.total_gib / result.peak_gib - 1
    if as_json:
        print(json.dumps({"pair": req.pair.name, "trace": result.to_dict(), "estimate": est.to_dict(),
                          "relative_difference": round(diff, 4)}, indent=2))
        return 0
    print(f"\n{req.pair.name}, {backend} on {req.world} GPU(s), micro-batch {micro_batch}, sender {k['seq_len']} tokens "
          f"(trace: {result.seconds:.0f} s on fake CPU tensors, SDPA)")
    print(f"{'GiB per GPU':<16} {'trace':>9} {'analytic':>9}")
    for c in memory.COMPONENTS:
        t, a = result.components.get(c, 0.0), est.components.get(c, 0.0)
        if t or a:
            print(f"{c:<16} {t:>9.2f} {a:>9.2f}")
    print(f"{'peak':<16} {result.peak_gib:>9.2f} {est.total_gib:>9.2f}   ({diff:+.1%}; trace peak in {result.phase}, "
          f"analytic at {est.phase})")
    if req.knobs["attention"] != "sdpa":
        print(f"note: traced with SDPA; the analytic estimate for {req.knobs['attention']} is "
              f"{estimate(req.knobs['attention']).total_gib:.2f} GiB")
    print(f"fits {req.gpu_memory_gb:g} GB with the margin: {'yes' if result.peak_gib <= memory.usable_gib(req.gpu_memory_gb) else 'NO'} "
          f"(usable {memory.usable_gib(req.gpu_memory_gb):.1f} GiB)")
    return 0
