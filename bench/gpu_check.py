"""`make gpu-check`: what only a GPU can show, in one run of at most ~8 minutes on one H100/H200, offline.

    python bench/gpu_check.py [--out bench/GPU.md] [--json]

Sections (each one says ok, failed, or "skipped: no CUDA device"; off a GPU the CPU-only parts still run,
which is how the test suite runs this script):
  environment     versions, the GPU, the compute dtype each precision setting gives here
  attention       FlashAttention-2: does its extension import and its kernel run, and what `auto` picks
  sdpa_kernels    which SDPA kernels (flash, memory-efficient, cuDNN, math) run the bridge's attention at
                  each receiver width, and how fast (CUDA)
  backends        ddp, fsdp and deepspeed: five steps of the tiny pair through the real CLI (`launch --local
                  --gpus 1`), on a one-rank NCCL group (CUDA)
  decoding        greedy decoding ignores a checkpoint's sampling/penalty generation config, and batched
                  generation equals one-by-one (CPU here, then CUDA)
  full_step       llama8b -> mistral7b at full size, random weights, at the planner's micro-batch: peak
                  reserved vs predicted, samples/s, model FLOPs utilisation from counted FLOPs (planner
                  numbers on CPU; the step itself on CUDA)
  measure_quick   `launch memory --measure` in its quick mode (two micro-batches) on llama3b -> qwen3b (CUDA)
Writes a Markdown report (bench/GPU.md by default); the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as jobs run (before torch)

import torch  # noqa: E402

from launcher.plan import make_plan  # noqa: E402
from launcher.profiles import load_profile  # noqa: E402
from telepathy import memory  # noqa: E402
from telepathy.config import BridgeConfig, RunConfig  # noqa: E402
from telepathy.registry import load_registry  # noqa: E402

NO_CUDA = "skipped: no CUDA device"
# Dense bf16 peak of the GPUs this is meant for (NVIDIA's data sheets, SXM parts), for the FLOPs utilisation.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
FULL_PAIR, MEASURE_PAIR = "llama8b-mistral7b", "llama3b-qwen3b"


def cuda() -> torch.device | None:
    return torch.device("cuda", 0) if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------ sections


def environment() -> dict:
    from telepathy.loading import compute_dtype
    from telepathy.measure import versions

    dev = cuda() or torch.device("cpu")
    out = {**versions(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        out.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    out["compute_dtype"] = {prec: str(compute_dtype(dev, prec)[0]) for prec in ("auto", "bf16", "fp32")}
    return {"status": "ok", "device": str(dev), **out}


def attention() -> dict:
    from telepathy.loading import flash_attention_works, select_attention

    dev = cuda() or torch.device("cpu")
    works, why = flash_attention_works(dev)
    choice, reason = select_attention(dev, "auto")
    # FA2 is used exactly when its kernel runs: the flag and the probe must agree
    ok = (choice == "flash_attention_2") == works
    return {
        "status": "ok" if ok else "failed",
        "flash_attention_2": works,
        "why": why,
        "auto": choice,
        "reason": reason,
    }


def sdpa_kernels() -> dict:
    dev = cuda()
    if dev is None:
        return {"status": NO_CUDA}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    reg, rows = load_registry(), []
    widths = sorted({reg.get(m).hidden for m in ("llama1b", "llama3b", "qwen7b", "llama8b")})
    for width in widths:
        heads = BridgeConfig().heads_for(width)
        # the bridge's cross-attention: 32 soft-token queries over 128 sender tokens, bf16, micro-batch 16
        q = torch.randn(16, heads, 32, width // heads, device=dev, dtype=torch.bfloat16)
        kv = torch.randn(16, heads, 128, width // heads, device=dev, dtype=torch.bfloat16)
        row = {"width": width, "heads": heads, "head_dim": width // heads}
        for backend in (
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH,
        ):
            try:
                with sdpa_kernel([backend]):
                    for _ in range(3):
                        sdpa(q, kv, kv)
                    torch.cuda.synchronize(dev)
                    t = time.perf_counter()
                    for _ in range(20):
                        sdpa(q, kv, kv)
                    torch.cuda.synchronize(dev)
                row[backend.name.lower()] = f"{(time.perf_counter() - t) / 20 * 1e6:.0f} us"
            except RuntimeError as e:
                row[backend.name.lower()] = f"does not run ({str(e).splitlines()[0][:60]})"
        rows.append(row)
    return {"status": "ok", "rows": rows}


def backends() -> dict:
    if cuda() is None:
        return {"status": NO_CUDA}
    rows, status = [], "ok"
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("ddp", "fsdp", "deepspeed"):
            argv = [
                sys.executable,
                "-m",
                "launcher.cli",
                "--pair",
                "tiny-llama-tiny-qwen",
                "--task",
                "demo",
                "--local",
                "--gpus",
                "1",
                "--backend",
                backend,
                "--steps",
                "5",
                "--eval-samples",
                "8",
                "--baselines",
                "",
                "--latency-samples",
                "0",
                "--name",
                f"gpu-{backend}",
                "--runs-dir",
                tmp,
            ]
            t = time.perf_counter()
            out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300)
            loss = None
            metrics = Path(tmp) / f"gpu-{backend}" / "metrics.jsonl"
            if metrics.is_file():
                train = [json.loads(x) for x in metrics.read_text().splitlines() if '"train"' in x]
                loss = train[-1]["loss"] if train else None
            ok = out.returncode == 0 and loss is not None and loss == loss
            status = status if ok else "failed"
            rows.append(
                {
                    "backend": backend,
                    "rc": out.returncode,
                    "final_loss": loss,
                    "seconds": round(time.perf_counter() - t, 1),
                    **({} if ok else {"stderr": out.stderr.strip().splitlines()[-3:]}),
                }
            )
    return {"status": status, "rows": rows}


def decoding() -> dict:
    from transformers import GenerationConfig

    from telepathy.loading import greedy, load_model, load_tokenizer

    spec = load_registry().get("tiny-qwen")
    tok = load_tokenizer(spec)
    tok.padding_side = "left"
    out = {"status": "ok"}
    for dev in [torch.device("cpu")] + ([cuda()] if cuda() is not None else []):
        lm = load_model(spec, device=dev, attn_implementation="sdpa")
        prompts = ["the film was", "a long and winding", "no"]
        batch = tok(prompts, return_tensors="pt", padding=True).to(dev)
        plain = greedy(lm, tok, 8, **batch)
        # a checkpoint asking for sampling and penalties: greedy must not inherit any of it
        lm.generation_config = GenerationConfig(do_sample=True, temperature=0.3, top_k=5, repetition_penalty=5.0)
        again = greedy(lm, tok, 8, **batch)
        singles = [greedy(lm, tok, 8, **tok([p], return_tensors="pt").to(dev))[0, -8:] for p in prompts]
        same = torch.equal(plain, again)
        batched = all(torch.equal(plain[i, -8:], s) for i, s in enumerate(singles))
        out[dev.type] = {"ignores_checkpoint_config": same, "batched_equals_single": batched}
        if not same:
            out["status"] = "failed"
    if cuda() is None:
        out["cuda"] = NO_CUDA
    return out


def _full_plan(pair_name: str, gpu_gb: float):
    pair = load_registry().pair(pair_name)
    cfg = RunConfig(sender=pair.sender.alias, receiver=pair.receiver.alias, run_dir="/tmp/gpu-check")
    prof = load_profile("dgx-h100", {"gpu_memory_gb": str(gpu_gb)}, environ={})
    return pair, make_plan(pair, cfg, gpus=1, profile=prof, mode="slurm")


def full_step() -> dict:
    dev = cuda()
    gpu_gb = round(torch.cuda.get_device_properties(dev).total_memory / 1e9) if dev is not None else 80
    pair, plan = _full_plan(FULL_PAIR, gpu_gb)
    micro = plan.batch.micro_batch
    shape = plan.shape
    predicted = memory.estimate(shape, micro).total_gib
    out = {
        "pair": FULL_PAIR,
        "gpu_gb": gpu_gb,
        "micro_batch": micro,
        "grad_accum": plan.batch.grad_accum,
        "predicted_peak_gib": round(predicted, 2),
    }
    if dev is None:
        return {"status": NO_CUDA + " (planner numbers above)", **out}
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from telepathy.backends import DDPWrapped
    from telepathy.loading import init_rotary_, select_attention
    from telepathy.measure import _batch
    from telepathy.step import build_telepathy_model
    from telepathy.trace import materialise

    attn = select_attention(dev, "auto")[0]
    shape = shape.replace(backend="ddp", world_size=1, attention=attn)
    cfg = shape.run_config(micro)
    model, _, _ = build_telepathy_model(cfg, pair, dev, meta=True)
    materialise(model, dev)
    init_rotary_(model, dev)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1, store=dist.HashStore(), device_id=dev)
    wrapped = DDPWrapped(model.train(), cfg, dev)
    batches = [_batch(shape, micro, dev) for _ in range(3)]

    def step(i: int) -> None:
        wrapped.micro_step(batches[i % 3], last=True)
        wrapped.optimizer_step()

    torch.cuda.reset_peak_memory_stats(dev)
    for i in range(2):  # warm-up; the second holds AdamW's state
        step(i)
    with FlopCounterMode(display=False) as counter:
        step(0)
    flops = counter.get_total_flops()
    torch.cuda.synchronize(dev)
    t, n = time.perf_counter(), 5
    for i in range(n):
        step(i)
    torch.cuda.synchronize(dev)
    seconds = (time.perf_counter() - t) / n
    reserved = torch.cuda.max_memory_reserved(dev) / memory.GIB
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(dev)), None)
    achieved = flops / seconds / 1e12
    out.update(
        attention=attn,
        peak_reserved_gib=round(reserved, 2),
        reserved_vs_predicted=f"{reserved / predicted - 1:+.1%}",
        step_s=round(seconds, 3),
        samples_per_s=round(micro / seconds, 1),
        tflops_per_s=round(achieved, 1),
        mfu=f"{achieved / peak:.1%}" if peak else "unknown peak for this GPU",
    )
    dist.destroy_process_group()
    return {"status": "ok", **out}


def measure_quick() -> dict:
    if cuda() is None:
        return {"status": NO_CUDA}
    out = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "memory", "--pair", MEASURE_PAIR, "--measure", "--quick", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=420,
    )
    if out.returncode != 0:
        return {"status": "failed", "stderr": out.stderr.strip().splitlines()[-3:]}
    result = json.loads(out.stdout)
    return {"status": "ok", "pair": MEASURE_PAIR, "tries": result.get("tries")}


SECTIONS = {f.__name__: f for f in (environment, attention, sdpa_kernels, backends, decoding, full_step, measure_quick)}


# ------------------------------------------------------------------------------------------ report


def markdown(results: dict, seconds: float) -> str:
    lines = [
        "# GPU check",
        "",
        f"`make gpu-check` on {results['environment'].get('gpu', 'no GPU (CPU parts only)')}, "
        f"{time.strftime('%Y-%m-%d')}, {seconds:.0f} s.",
        "",
    ]
    for name, r in results.items():
        lines += [f"## {name}: {r.get('status')}", ""]
        rows = r.get("rows")
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
        rest = {k: v for k, v in r.items() if k not in ("status", "rows")}
        if rest:
            lines += ["```", json.dumps(rest, indent=1, default=str), "```"]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "GPU.md"))
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run only these sections")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    start, results = time.perf_counter(), {}
    for name, fn in SECTIONS.items():
        if args.only and name not in args.only and name != "environment":
            continue
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001  one broken section must not hide the others
            results[name] = {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}",
                "where": traceback.format_exc(limit=3),
            }
        print(f"{name}: {results[name]['status']} ({time.perf_counter() - t:.1f} s)", flush=True)
    text = markdown(results, time.perf_counter() - start)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(results, default=str))
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
