"""`launch memory --measure`: real training steps on this machine's GPU at increasing micro-batch.

Builds the pair at full size on the GPU with random weights (memory does not depend on their values, and
nothing is downloaded), runs the trainer's own step (backends.Wrapped: forward, backward, clip, AdamW)
twice per micro-batch, and records torch.cuda.max_memory_allocated / max_memory_reserved. Micro-batches
double up to the analytic limit, never past what the estimate says fits, and stop at the first one whose
reserved memory leaves less than the safety margin. The largest that fits becomes a measured row of the
memory table (written atomically; seed rows and their provenance stay).
"""

from __future__ import annotations

import datetime
import json
import platform

import torch

from telepathy import memory
from telepathy.errors import UserError
from telepathy.registry import Pair


def require_gpu() -> torch.device:
    if not torch.cuda.is_available():
        raise UserError("--measure needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False); "
                        "run it on a GPU node, e.g. `srun --gpus 1 launch memory --pair P --measure`")
    return torch.device("cuda", torch.cuda.current_device())


def _batch(micro_batch: int, knobs: dict, pair: Pair, device: torch.device):
    from telepathy.step import Batch

    b, s, a = micro_batch, knobs["seq_len"], knobs["answer_len"]
    ids = lambda n, vocab: torch.randint(0, vocab, (b, n), device=device)  # noqa: E731
    ones = lambda n: torch.ones(b, n, dtype=torch.long, device=device)  # noqa: E731
    return Batch(sender_ids=ids(s, pair.sender.vocab), sender_mask=ones(s), primer_ids=ids(memory.PRIMER_LEN, pair.receiver.vocab),
                 answer_ids=ids(a, pair.receiver.vocab), answer_mask=ones(a))


def measure(pair: Pair, *, knobs: dict, gpu_memory_gb: float, say=print) -> list[dict]:
    """One record per micro-batch tried: allocated/reserved peaks (GiB), the estimate, and whether it fit."""
    from telepathy.backends import wrap
    from telepathy.step import build_telepathy_model
    from telepathy.trace import _materialise, run_config

    device = require_gpu()
    cfg = run_config(pair, backend="ddp", micro_batch=1, seq_len=knobs["seq_len"], answer_len=knobs["answer_len"],
                     bridge=knobs["bridge"], activation_checkpointing=knobs["activation_checkpointing"],
                     bridge_dtype=knobs["bridge_dtype"])
    model, _, _ = build_telepathy_model(cfg, pair, device, meta=True)
    _materialise(model, device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    wrapped = wrap(model, "ddp", cfg, device)
    est_knobs = dict(knobs, backend="ddp", world_size=1)
    limit = memory.max_micro_batch(pair, gpu_memory_gb=gpu_memory_gb, **est_knobs)
    device_gib = torch.cuda.get_device_properties(device).total_memory / memory.GIB
    usable = min(memory.usable_gib(gpu_memory_gb), device_gib - memory.safety_margin_gib(gpu_memory_gb))
    tries, b = [], 1
    while b <= max(limit, 1):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        record = {"micro_batch": b, "estimate_gib": round(memory.estimate(pair, micro_batch=b, **est_knobs).total_gib, 3)}
        try:
            for _ in range(2):  # the second step holds AdamW's state
                wrapped.micro_step(_batch(b, knobs, pair, device), last=True)
                wrapped.optimizer_step()
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            wrapped.optimizer.zero_grad(set_to_none=True)
            record.update(oom=True, fits=False)
            tries.append(record)
            say(f"micro-batch {b}: out of memory")
            break
        record.update(allocated_gib=round(torch.cuda.max_memory_allocated(device) / memory.GIB, 3),
                      reserved_gib=round(torch.cuda.max_memory_reserved(device) / memory.GIB, 3))
        record["fits"] = record["reserved_gib"] <= usable
        tries.append(record)
        say(f"micro-batch {b}: allocated {record['allocated_gib']:.2f} GiB, reserved {record['reserved_gib']:.2f} GiB "
            f"(estimate {record['estimate_gib']:.2f})")
        if not record["fits"]:
            break
        b = limit if b < limit <= 2 * b else 2 * b
    return tries


def versions() -> dict[str, str]:
    import transformers

    return {"torch": str(torch.__version__), "transformers": str(transformers.__version__), "cuda": str(torch.version.cuda),
            "python": platform.python_version()}


def measure_command(pair: Pair, *, knobs: dict, gpu_memory_gb: float, global_batch: int | None, as_json: bool) -> int:
    from launcher.plan import DEFAULT_GLOBAL_BATCH, choose_batch
    from launcher.table import TableRow, load_table, save_table

    require_gpu()
    say = (lambda _m: None) if as_json else (lambda m: print(m, flush=True))
    tries = measure(pair, knobs=knobs, gpu_memory_gb=gpu_memory_gb, say=say)
    good = [t for t in tries if t["fits"]]
    if not good:
        raise UserError(f"{pair.name}: not even micro-batch 1 fits this GPU with the safety margin; "
                        "shorten --max-length or use --activation-checkpointing")
    best = good[-1]
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    rows = load_table()
    seed = next((r for r in rows if r.matches(pair, seq_len=knobs["seq_len"], backend="ddp", gpu_memory_gb=gpu_memory_gb)
                 and r.measured is None), None)
    target = global_batch or (seed.effective_batch if seed else DEFAULT_GLOBAL_BATCH)
    micro, accum, _ = choose_batch(target, best["micro_batch"], 1)
    row = TableRow(sender=pair.sender.arch_key, receiver=None if pair.single else pair.receiver.arch_key,
                   micro_batch=micro, grad_accum=accum, effective_batch=micro * accum, gpu_memory_gb=gpu_memory_gb,
                   seq_len=knobs["seq_len"], dtype="bf16", backend="ddp", provenance=f"measured on {gpu} {date}",
                   measured={"gpu": gpu, "date": date, "versions": versions(), "peak_reserved_gib": best["reserved_gib"],
                             "peak_allocated_gib": best["allocated_gib"], "estimate_gib": best["estimate_gib"],
                             "largest_fitting_micro_batch": best["micro_batch"], "tries": tries})
    same = lambda r: (r.measured is not None and (r.sender, r.receiver, r.seq_len, r.backend, r.gpu_memory_gb)  # noqa: E731
                      == (row.sender, row.receiver, row.seq_len, row.backend, row.gpu_memory_gb))
    save_table([r for r in rows if not same(r)] + [row])
    if as_json:
        print(json.dumps({"row": row.to_dict()}, indent=2))
    else:
        print(f"wrote a measured row to the memory table: {pair.name} micro-batch {micro} x accumulation {accum} "
              f"(largest that fits: {best['micro_batch']}, reserved {best['reserved_gib']:.1f} GiB, estimate "
              f"{best['estimate_gib']:.1f} GiB)")
    return 0
