import os

import pytest

from launcher.plan import Plan, choose_batch, layout_for, local_gpus, make_plan, torchrun_command
from launcher.profiles import load_profile
from launcher.table import load_table
from telepathy import memory
from telepathy.config import DataConfig, RunConfig
from telepathy.errors import UserError
from telepathy.registry import load_registry

REG = load_registry()
DGX = load_profile("dgx-h100", environ={})


def cfg(pair, **data):
    return RunConfig(
        sender=pair.sender.alias,
        receiver=pair.receiver.alias,
        run_dir="/tmp/r",
        data=DataConfig(**data) if data else DataConfig(),
    )


@pytest.mark.parametrize("gpus,nodes,per_node", [(1, 1, 1), (4, 1, 4), (8, 1, 8), (16, 2, 8), (64, 8, 8)])
def test_layout_fills_nodes(gpus, nodes, per_node):
    lay = layout_for(gpus, DGX, "slurm")
    assert (lay.nodes, lay.gpus_per_node, lay.world_size) == (nodes, per_node, gpus)


def test_local_and_debug_layouts(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: the ranks run on the CPU, as many as asked
    assert layout_for(3, DGX, "local").world_size == 3
    assert layout_for(16, DGX, "debug").world_size == 1


def test_local_asks_no_more_ranks_than_the_machine_has_gpus(monkeypatch, tmp_path):
    """Each rank takes cuda:LOCAL_RANK: more ranks than GPUs died in set_device after startup."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert local_gpus() == 2 and layout_for(2, DGX, "local").world_size == 2
    with pytest.raises(UserError, match="needs 4 GPUs and this machine shows 2; use --gpus 2"):
        layout_for(4, DGX, "local")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # then nvidia-smi decides: here a stand-in listing one GPU
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert local_gpus() == 1


@pytest.mark.parametrize(
    "target,max_micro,world,expect",
    [
        (12, 6, 1, (6, 2, 12)),
        (12, 6, 4, (3, 1, 12)),
        (8, 2, 1, (2, 4, 8)),
        (8, 2, 16, (1, 1, 16)),
        (12, 6, 5, (3, 1, 15)),
        (16, 100, 2, (8, 1, 16)),
        (256, 4, 8, (4, 8, 256)),
    ],
)
def test_choose_batch(target, max_micro, world, expect):
    micro, accum, glob = choose_batch(target, max_micro, world)
    assert (micro, accum, glob) == expect
    assert micro <= max_micro and glob >= target


def test_table_row_drives_batch_and_is_traceable():
    pair = REG.pair("llama3b-qwen3b")
    plan = make_plan(pair, cfg(pair), gpus=4, profile=DGX, mode="slurm")
    row = plan.batch.table_row
    assert plan.batch.source == "table" and row["provenance"] == "seed table"
    assert (row["micro_batch"], row["grad_accum"], row["effective_batch"]) == (6, 2, 12)
    assert plan.batch.global_batch == 12 and plan.run.train.micro_batch * plan.run.train.grad_accum * 4 == 12


def test_instruct_twin_uses_base_row():
    pair = REG.pair("llama3b-instruct-qwen3b-instruct")
    assert make_plan(pair, cfg(pair), gpus=1, profile=DGX, mode="slurm").batch.source == "table"


def test_rounding_is_said():
    pair = REG.pair("llama8b-mistral7b")
    plan = make_plan(pair, cfg(pair), gpus=16, profile=DGX, mode="slurm")
    assert plan.batch.global_batch == 16 and plan.batch.target_global_batch == 8
    assert any("instead of the target 8" in n for n in plan.batch.notes)


def test_a_plan_larger_than_the_cluster_is_refused_at_planning():
    pair = REG.pair("llama3b-qwen3b")
    four = load_profile("dgx-h100", {"max_nodes": "4"}, environ={})
    assert make_plan(pair, cfg(pair), gpus=32, profile=four, mode="slurm", global_batch=32).layout.nodes == 4
    with pytest.raises(UserError, match=r"needs 5 nodes .* at most 4 \(max_nodes\); use at most --gpus 32"):
        make_plan(pair, cfg(pair), gpus=40, profile=four, mode="slurm", global_batch=40)


def test_a_global_batch_far_beyond_the_target_is_refused_unless_asked_for():
    """More GPUs than samples: 1 sample per GPU already exceeds the table row's 12 past 4x (at 4x: a note)."""
    pair = REG.pair("llama3b-qwen3b")
    assert make_plan(pair, cfg(pair), gpus=48, profile=DGX, mode="slurm").batch.global_batch == 48
    with pytest.raises(UserError, match="--gpus 56 makes the global batch at least 56 .* target 12.*--gpus 48"):
        make_plan(pair, cfg(pair), gpus=56, profile=DGX, mode="slurm")
    assert make_plan(pair, cfg(pair), gpus=56, profile=DGX, mode="slurm", global_batch=56).batch.global_batch == 56


def test_no_row_uses_memory_model():
    pair = REG.pair("qwen7b-mistral7b")
    plan = make_plan(pair, cfg(pair), gpus=8, profile=DGX, mode="slurm")
    assert plan.batch.source == "estimate" and plan.batch.table_row is None
    assert plan.batch.max_micro_batch_estimate == memory.max_micro_batch(plan.shape, 80)
    assert plan.shape.world_size == 8 and plan.shape.seq_len == plan.run.data.max_length
    assert plan.run.predicted_peak_gib == pytest.approx(plan.memory["total_gib"], abs=1e-3)


def test_row_not_used_for_longer_sequences_or_other_backends():
    pair = REG.pair("llama3b-qwen3b")
    assert make_plan(pair, cfg(pair, max_length=4096), gpus=1, profile=DGX, mode="slurm").batch.source == "estimate"
    fsdp = cfg(pair).replace(backend="fsdp")
    assert make_plan(pair, fsdp, gpus=2, profile=DGX, mode="slurm").batch.source == "estimate"


def test_row_that_does_not_fit_is_flagged():
    pair = REG.pair("llama8b-mistral7b")
    small = load_profile("dgx-h100", {"gpu_memory_gb": "48"}, environ={})
    rows = [
        r.__class__(**{**r.__dict__, "gpu_memory_gb": 48, "micro_batch": 400, "grad_accum": 1, "effective_batch": 400})
        for r in load_table()
        if r.sender == "llama8b" and r.receiver == "mistral7b"
    ]
    plan = make_plan(pair, cfg(pair), gpus=1, profile=small, mode="slurm", table=rows)
    assert any("does not fit" in n for n in plan.batch.notes)


def test_weights_that_cannot_fit_are_an_error_naming_fsdp():
    pair = REG.pair("llama8b-mistral7b")
    with pytest.raises(UserError, match="fsdp"):
        make_plan(
            pair, cfg(pair), gpus=1, profile=load_profile("dgx-h100", {"gpu_memory_gb": "24"}, environ={}), mode="slurm"
        )


def test_plan_round_trips_through_json(tmp_path):
    pair = REG.pair("llama3b-qwen3b")
    plan = make_plan(pair, cfg(pair), gpus=16, profile=DGX, mode="slurm")
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


def test_torchrun_commands():
    pair = REG.pair("llama8b-mistral7b")
    one = make_plan(pair, cfg(pair), gpus=8, profile=DGX, mode="slurm")
    assert torchrun_command(one, config_path="c.json")[:2] == ["torchrun", "--standalone"]
    two = make_plan(pair, cfg(pair), gpus=16, profile=DGX, mode="slurm")
    argv = torchrun_command(two, config_path="c.json", node_rank=1, rdzv_endpoint="n1:29400", rdzv_id="77")
    assert "--nnodes=2" in argv and "--node_rank=1" in argv and "--rdzv_endpoint=n1:29400" in argv
    assert "--nproc_per_node=8" in argv and "--rdzv_backend=c10d" in argv
    with pytest.raises(ValueError):  # never a silent localhost fallback
        torchrun_command(two, config_path="c.json", node_rank=0)
