"""`launch memory`: batch choice per backend, the trace beside the estimate, --measure without a GPU."""

import json

import pytest

from launcher.plan import make_plan
from launcher.profiles import load_profile
from telepathy import memory
from telepathy.config import DataConfig, RunConfig
from telepathy.registry import load_registry
from telepathy.shape import StepShape


def test_batch_choice_per_backend_json(launch):
    r = launch(
        "memory", "--pair", "qwen7b-mistral7b", "--max-length", "1536", "--gpus", "4", "--global-batch", "64", "--json"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [b["backend"] for b in out["backends"]] == ["ddp", "fsdp", "deepspeed"]
    assert out["usable_gib"] == pytest.approx(memory.usable_gib(80), abs=0.01)
    pair = load_registry().pair("qwen7b-mistral7b")
    for b in out["backends"]:
        assert b["fits"] == memory.max_micro_batch(
            StepShape(pair, seq_len=1536, backend=b["backend"], world_size=4), 80
        )
        assert b["micro_batch"] <= b["fits"] and b["micro_batch"] * b["grad_accum"] * 4 == b["global_batch"] >= 64
        assert b["estimate_gib"] <= out["usable_gib"]
        assert b["table_row"] is None  # no seed row for this pair


def test_text_output_states_margin_and_table_row(launch):
    r = launch("memory", "--pair", "llama8b-mistral7b", "--max-length", "1536", "--gpus", "1", "--micro-batch", "2")
    assert r.returncode == 0, r.stderr
    assert "GiB usable" in r.stdout and "fragmentation" in r.stdout
    assert "micro 2 (seed table)" in r.stdout  # the seed row shown beside the estimate
    assert "ddp at micro-batch 2:" in r.stdout


def test_single_model_pair_cannot_use_fsdp(launch):
    r = launch("memory", "--pair", "llama8b", "--max-length", "1536", "--json")
    fsdp = next(b for b in json.loads(r.stdout)["backends"] if b["backend"] == "fsdp")
    assert fsdp["fits"] == 0 and "single-model" in fsdp["why"]


def test_measure_without_gpu_says_so_and_exits_2(launch):
    r = launch("memory", "--pair", "llama8b-mistral7b", "--measure")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--trace", "--micro-batch", "1", "--backend", "deepspeed"], "--trace supports ddp and fsdp"),
        (["--micro-batch", "0"], "--micro-batch"),
        (["--trace", "--measure"], "not allowed with"),
    ],
)
def test_bad_memory_flags_exit_2(launch, argv, words):
    r = launch("memory", "--pair", "tiny-llama-tiny-qwen", *argv)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


def test_trace_command_beside_estimate(launch):
    r = launch(
        "memory",
        "--pair",
        "tiny-llama-tiny-qwen",
        "--max-length",
        "64",
        "--micro-batch",
        "4",
        "--trace",
        "--gpus",
        "1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["trace"]["peak_gib"] > 0 and abs(out["relative_difference"]) < 0.05


def test_planner_takes_batch_from_estimate_without_table_row():
    pair = load_registry().pair("qwen7b-mistral7b")
    run = RunConfig(sender="qwen7b", receiver="mistral7b", run_dir="/tmp/r", data=DataConfig(max_length=1536))
    plan = make_plan(pair, run, gpus=8, profile=load_profile("dgx-h100", environ={}), mode="slurm", table=[])
    shape = StepShape(pair, seq_len=1536, world_size=8)
    assert plan.shape == shape
    fits = memory.max_micro_batch(shape, 80)
    assert plan.batch.source == "estimate" and plan.batch.max_micro_batch_estimate == fits
    assert plan.memory["total_gib"] == pytest.approx(memory.estimate(shape, plan.batch.micro_batch).total_gib, abs=1e-3)
