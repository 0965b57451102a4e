"""`launch --dry-run`: the plan and the exact sbatch bytes, torch-free."""

import json
import subprocess
import sys

from conftest import REPO


def test_dry_run_one_node_four_gpus_from_the_table(launch):
    r = launch("--pair", "llama3b-qwen3b", "--gpus", "4", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "1 node(s) x 4 GPU(s)" in r.stdout
    assert "table row llama3b-qwen3b: micro 6 x accum 2 = 12" in r.stdout
    assert "#SBATCH --nodes=1" in r.stdout and "torchrun --standalone" in r.stdout


def test_dry_run_two_nodes_rendezvous_on_first(launch):
    r = launch("--pair", "llama8b-mistral7b", "--gpus", "16", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    run = doc["runs"][0]
    assert run["plan"]["layout"] == {"nodes": 2, "gpus_per_node": 8, "world_size": 16}
    assert "#SBATCH --nodes=2" in doc["sbatch"]
    for rank, argv in enumerate(run["torchrun"]):
        assert f"--node_rank={rank}" in argv and "--nnodes=2" in argv and "--rdzv_backend=c10d" in argv
        assert any(a.startswith("--rdzv_endpoint=$FIRST_NODE") for a in argv)


def test_json_schema_is_stable(launch):
    r = launch("--pair", "qwen7b-mistral7b", "--gpus", "8", "--dry-run", "--json")
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1
    plan = doc["runs"][0]["plan"]
    assert set(plan) == {"run", "mode", "device", "layout", "batch", "profile", "memory"}
    assert set(plan["batch"]) >= {
        "micro_batch",
        "grad_accum",
        "global_batch",
        "target_global_batch",
        "source",
        "table_row",
        "max_micro_batch_estimate",
        "notes",
    }
    assert plan["batch"]["source"] == "estimate" and plan["memory"]["total_gib"] > 0


def test_dry_run_never_imports_torch_or_transformers(tmp_path):
    code = (
        "import sys; from launcher.cli import main; rc = main(['--pair','llama3b-qwen3b','--gpus','4','--dry-run']);"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print('IMPORTED', bad); sys.exit(rc)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"TELEPATHY_RUNS": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_sweep_dry_run_is_one_array_script(launch):
    r = launch("--pair", "llama3b-qwen3b", "--gpus", "4", "--sweep", "seed=1,2,3", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["runs"]) == 3 and doc["sbatch"].count("#SBATCH --array=") == 1
    assert [run["plan"]["run"]["train"]["seed"] for run in doc["runs"]] == [1, 2, 3]
