"""Peak host memory of one node while a run loads and takes its first steps: FSDP (frozen models built on the
meta device, shards filled from rank 0's one copy) against DDP (every rank holds whole models, as FSDP did
before). Real torchrun with N CPU processes (gloo), a llama-shaped random-weight pair of ~0.4 B parameters
each (defined here, in a user registry), RSS of the whole process tree sampled every 20 ms; the same run of
the tiny pair gives the per-process overhead (interpreter, torch, transformers) that is subtracted before
counting model copies.

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
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from telepathy.config import BridgeConfig  # noqa: E402
from telepathy.loading import compute_dtype  # noqa: E402
from telepathy.memory import frozen_param_counts  # noqa: E402
from telepathy.registry import load_registry  # noqa: E402

PAIR, TINY = "host-sender-host-receiver", "tiny-llama-tiny-qwen"
MODEL = {
    "family": "llama",
    "weights": "random",
    "tokenizer": "mistral-common:tokenizer.model.v1",
    "hidden": 1536,
    "layers": 12,
    "heads": 12,
    "kv_heads": 4,
    "head_dim": 128,
    "intermediate": 4096,
    "vocab": 32768,
    "tied_embeddings": False,
    "rope_theta": 500000.0,
    "max_position": 4096,
    "rms_norm_eps": 1.0e-5,
}


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(backend: str, ranks: int, runs_dir: str, pair: str = PAIR) -> dict:
    argv = [
        sys.executable,
        "-m",
        "launcher.cli",
        "--pair",
        pair,
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
        f"{pair}-{backend}",
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
    dtype = compute_dtype("cpu")[0]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config"
        config.mkdir()
        (config / "models.yaml").write_text(
            yaml.safe_dump({"models": {"host-sender": MODEL, "host-receiver": MODEL}}, sort_keys=False)
        )
        os.environ["TELEPATHY_CONFIG_DIR"] = str(config)
        pair = load_registry().pair(PAIR)
        # what the run holds: the sender up to its tapped layer, the whole receiver
        weights = sum(frozen_param_counts(pair, BridgeConfig(), False).values()) * dtype.itemsize / 2**30
        rows = []
        for backend in ("ddp", "fsdp"):
            overhead = run(backend, args.ranks, tmp, TINY)["peak_rss_gib"]  # N processes, next to no weights
            row = run(backend, args.ranks, tmp)
            row.update(overhead_gib=overhead, copies=(row["peak_rss_gib"] - overhead) / weights)
            rows.append(row)
    lines = [
        "# Host memory per node while loading",
        "",
        f"`python bench/host_memory.py --ranks {args.ranks}`: {PAIR}, frozen weights {weights:.2f} GiB "
        f"({str(dtype).removeprefix('torch.')}, this CPU's compute dtype), {args.ranks} torchrun ranks on one node "
        "(CPU, gloo), peak RSS of the process tree. `model copies` = (peak - the same run's peak with the tiny "
        "pair) / one copy of the weights: DDP holds one per rank by design; FSDP's goal is about one per node.",
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
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
