"""Peak host memory of one node while a run loads and takes its first steps: FSDP (frozen models built on the
meta device, shards filled from rank 0's one copy) against DDP (every rank holds whole models, as FSDP did
before). Real torchrun with N CPU processes (gloo), the bench-llama -> bench-mistral pair (random weights,
real vocabularies), RSS of the whole process tree sampled every 20 ms.

    python bench/host_memory.py [--ranks 4] [--out bench/HOST_MEMORY.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from telepathy.config import BridgeConfig  # noqa: E402
from telepathy.loading import compute_dtype  # noqa: E402
from telepathy.memory import frozen_param_counts  # noqa: E402
from telepathy.registry import load_registry  # noqa: E402

PAIR = "bench-llama-bench-mistral"


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(backend: str, ranks: int, runs_dir: str) -> dict:
    argv = [
        sys.executable,
        "-m",
        "launcher.cli",
        "--pair",
        PAIR,
        "--task",
        "demo",
        "--local",
        "--gpus",
        str(ranks),
        "--backend",
        backend,
        "--steps",
        "2",
        "--eval-samples",
        "4",
        "--baselines",
        "",
        "--latency-samples",
        "0",
        "--max-length",
        "32",
        "--micro-batch",
        "1",
        "--name",
        backend,
        "--runs-dir",
        runs_dir,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(watched))
        time.sleep(0.02)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{backend} failed:\n{err[-2000:]}")
    return {"backend": backend, "ranks": ranks, "peak_rss_gib": peak / 2**30, "seconds": time.perf_counter() - start}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "bench" / "HOST_MEMORY.md"))
    args = ap.parse_args()
    pair = load_registry().pair(PAIR)
    dtype = compute_dtype("cpu")[0]
    # what the run holds: the sender up to its tapped layer, the whole receiver
    weights = sum(frozen_param_counts(pair, BridgeConfig(), False).values()) * dtype.itemsize / 2**30
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(b, args.ranks, tmp) for b in ("ddp", "fsdp")]
        base = run("ddp", 1, tmp + "/one")  # one process: the interpreter, torch and one copy of the models
    for r in rows:
        r["copies"] = (r["peak_rss_gib"] - args.ranks * (base["peak_rss_gib"] - weights)) / weights
    lines = [
        "# Host memory per node while loading",
        "",
        f"`python bench/host_memory.py --ranks {args.ranks}`: {PAIR}, frozen weights {weights:.2f} GiB "
        f"({str(dtype).removeprefix('torch.')}, this CPU's compute dtype), {args.ranks} torchrun ranks on one node "
        f"(CPU, gloo), peak RSS of the process tree. A single process peaks at {base['peak_rss_gib']:.2f} GiB; "
        "`model copies` = (peak - ranks x the per-process overhead) / one copy of the weights.",
        "",
        "| backend | ranks | peak RSS (GiB) | model copies | seconds |",
        "|---|---|---|---|---|",
        *(
            f"| {r['backend']} | {r['ranks']} | {r['peak_rss_gib']:.2f} | {r['copies']:.1f} | {r['seconds']:.0f} |"
            for r in rows
        ),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print(json.dumps(rows + [base]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
