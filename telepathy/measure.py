"""Real training steps on this machine's GPU at increasing micro-batch (`launch memory --measure`).

Builds the pair at full size on the GPU with random weights (memory does not depend on their values, and
nothing is downloaded) and measures what training runs: the attention kernel the trainer selects, the
allocator setting SLURM jobs use (expandable segments), the DDP reducer's gradient buckets (a one-rank
process group) and the trainer's own step (forward, backward, clip, AdamW), twice per micro-batch.
Micro-batches double up to the analytic limit and stop at the first whose reserved memory crosses the
safety margin, or that runs out of memory in any of the forms CUDA reports it. The launcher turns the
tries into a measured row of the memory table (launcher/cmd_memory.py).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

import torch
import torch.distributed as dist
import transformers

from telepathy import memory
from telepathy.backends import DDPWrapped
from telepathy.errors import UserError
from telepathy.loading import init_rotary_, select_attention
from telepathy.shape import StepShape
from telepathy.step import Batch, build_telepathy_model
from telepathy.trace import materialise

ALLOC_CONF = "expandable_segments:True"  # what submitted jobs export (launcher/submit.py)
# How CUDA reports running out of memory besides torch.cuda.OutOfMemoryError: cuBLAS workspaces, NCCL and
# kernels that allocate themselves (flash-attn) raise plain RuntimeErrors.
_OOM_MESSAGES = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "cudaErrorMemoryAllocation",
)


def is_oom(error: BaseException) -> bool:

    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in _OOM_MESSAGES)
    )


def require_gpu():

    if not torch.cuda.is_available():
        raise UserError(
            "--measure needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False); "
            "run it on a GPU node, e.g. `srun --gpus 1 launch memory --pair P --measure`"
        )
    return torch.device("cuda", torch.cuda.current_device())


def _batch(shape: StepShape, micro_batch: int, device):

    b, pair = micro_batch, shape.pair

    def ids(n: int, vocab: int):
        return torch.randint(0, vocab, (b, n), device=device)

    def ones(n: int):
        return torch.ones(b, n, dtype=torch.long, device=device)

    return Batch(
        sender_ids=ids(shape.seq_len, pair.sender.vocab),
        sender_mask=ones(shape.seq_len),
        primer_ids=ids(shape.primer_len, pair.receiver.vocab),
        answer_ids=ids(shape.answer_len, pair.receiver.vocab),
        answer_mask=ones(shape.answer_len),
    )


def measure(
    shape: StepShape, gpu_memory_gb: float, say: Callable[[str], None] = print, *, quick: bool = False
) -> list[dict]:
    """One record per micro-batch tried: allocated/reserved peaks (GiB), the estimate, and whether it fit.
    `quick`: micro-batch 1 and the analytic limit only."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)  # before CUDA's allocator starts

    device = require_gpu()
    # What training runs: "auto" (FlashAttention-2 when it works) unless the run asks for another kernel.
    attention = select_attention(device, "auto" if shape.attention == "sdpa" else shape.attention)[0]
    shape = shape.replace(backend="ddp", world_size=1, attention=attention)
    cfg = shape.run_config(1)
    model, _, _ = build_telepathy_model(cfg, shape.pair, device, meta=True)
    materialise(model, device)
    init_rotary_(model, device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    if not dist.is_initialized():  # one rank, so the DDP reducer and its buckets exist as in training
        dist.init_process_group("nccl", rank=0, world_size=1, store=dist.HashStore(), device_id=device)
    wrapped = DDPWrapped(model.train(), cfg, device)
    limit = memory.max_micro_batch(shape, gpu_memory_gb)
    device_gib = torch.cuda.get_device_properties(device).total_memory / memory.GIB
    usable = min(memory.usable_gib(gpu_memory_gb), device_gib - memory.safety_margin_gib(gpu_memory_gb))
    tries, b = [], 1
    say(f"attention {attention}; micro-batches up to the analytic limit {limit}; usable {usable:.1f} GiB")
    while b <= max(limit, 1):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        record = {"micro_batch": b, "estimate_gib": round(memory.estimate(shape, b).total_gib, 3)}
        try:
            for _ in range(2):  # the second step holds AdamW's state
                wrapped.micro_step(_batch(shape, b, device), last=True)
                wrapped.optimizer_step()
            torch.cuda.synchronize()
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            wrapped.optimizer.zero_grad(set_to_none=True)
            record.update(oom=True, fits=False, error=str(e).splitlines()[0][:200])
            tries.append(record)
            say(f"micro-batch {b}: out of memory")
            break
        record.update(
            allocated_gib=round(torch.cuda.max_memory_allocated(device) / memory.GIB, 3),
            reserved_gib=round(torch.cuda.max_memory_reserved(device) / memory.GIB, 3),
        )
        record["fits"] = record["reserved_gib"] <= usable
        tries.append(record)
        say(
            f"micro-batch {b}: allocated {record['allocated_gib']:.2f} GiB, reserved {record['reserved_gib']:.2f} GiB "
            f"(estimate {record['estimate_gib']:.2f})"
        )
        if not record["fits"]:
            break
        b = limit if quick or b < limit <= 2 * b else 2 * b
        if quick and len(tries) == 2:
            break
    return tries


def versions() -> dict[str, str]:

    return {
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
    }


def gpu_name() -> str:

    return torch.cuda.get_device_name()
