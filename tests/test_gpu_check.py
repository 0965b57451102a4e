"""`make gpu-check` off a GPU: the script runs its CPU-only parts (environment, attention selection,
decoding, the planner's numbers for the full-size step) and says "skipped: no CUDA device" for the rest."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run `make gpu-check` itself")
def test_gpu_check_runs_its_cpu_parts_and_skips_the_rest(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--out", str(tmp_path / "GPU.md"), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    skipped = {k for k, r in results.items() if r["status"].startswith("skipped: no CUDA device")}
    assert skipped == {"sdpa_kernels", "backends", "full_step", "measure_quick"}
    assert results["attention"] == {**results["attention"], "status": "ok", "auto": "sdpa", "flash_attention_2": False}
    assert results["decoding"]["cpu"] == {"ignores_checkpoint_config": True, "batched_equals_single": True}
    step = results["full_step"]  # the planner's side of the full-size step, for the GPU run to compare with
    assert step["pair"] == "llama8b-mistral7b" and step["micro_batch"] >= 1 and 0 < step["predicted_peak_gib"] < 80
    report = (tmp_path / "GPU.md").read_text()
    assert "## backends: skipped: no CUDA device" in report and "## decoding: ok" in report
