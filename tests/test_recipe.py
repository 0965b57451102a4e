"""Recipes (launcher/recipe.py): validation as one line naming the file and key, the expansion into runs and
array jobs, the command line over the recipe, and `launch --recipe table1 --dry-run --json` without torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from launcher.flags import LaunchRequest
from launcher.recipe import load_recipe, recipe_runs, with_cli
from telepathy.config import METHODS
from telepathy.errors import UserError

GOOD = """
pairs: [tiny-llama-tiny-qwen]
tasks: [demo]
methods: [bridge, receiver]
seeds: [1, 2]
settings: {steps: 3}
"""


@pytest.mark.parametrize(
    "change,key,problem",
    [
        ("stepz: 3", "stepz", "unknown key"),
        ("methods: [bridge, magic]", "methods", "unknown method 'magic'"),
        ("settings: {lr: abc}", "settings.lr", "bad value 'abc'"),
        ("settings: {lrr: 1}", "settings.lrr", "unknown setting 'lrr'"),
        ("settings: {seed: 3}", "settings.seed", "decided by the recipe's 'seeds' list"),
        ("settings: {steps: null}", "settings.steps", "cannot be null"),
        ("settings: {sender_cache: 1}", "settings.sender_cache", "true or false"),
        ("pairs: [nope-nada]", "pairs", "nope"),
        ("tasks: [nonesuch]", "tasks", "unknown task 'nonesuch'"),
        ("seeds: [1, 1]", "seeds", "lists a value twice"),
        ("seeds: [one]", "seeds", "must be a list of ints"),
        ("cost: {mfu: 2}", "cost.mfu", "up to 1"),
        ("method_settings: {lora: {gpus: 0}}", "method_settings.lora.gpus", ">= 1"),
        ("method_settings: {magic: {}}", "method_settings.magic", "unknown method"),
    ],
)
def test_a_bad_key_or_value_is_one_line_naming_file_and_key(tmp_path, change, key, problem):
    path = tmp_path / "bad.yaml"
    lines = [line for line in GOOD.strip().splitlines() if not line.startswith(change.split(":")[0] + ":")]
    path.write_text("\n".join(lines + [change]) + "\n")
    with pytest.raises(UserError) as e:
        load_recipe(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}: ") and problem in msg and "\n" not in msg


def test_the_users_recipe_folder_layers_over_the_shipped_one(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "demo.yaml").write_text(GOOD.replace("{steps: 3}", "{steps: 3, sender_cache: true}"))
    monkeypatch.setenv("TELEPATHY_CONFIG_DIR", str(tmp_path))
    mine = load_recipe("demo")
    assert mine.path == str(tmp_path / "recipes" / "demo.yaml") and mine.methods == ("bridge", "receiver")
    _, runs, _ = recipe_runs(mine, LaunchRequest(cluster="local", runs_dir=str(tmp_path / "runs"), name="m"))
    assert [r.plan.run.train.sender_cache for r in runs] == [True, True]  # bridge runs (the floor rides on one)
    assert load_recipe("table1").path.endswith("configs/recipes/table1.yaml")  # the shipped one still there


def test_the_cli_refuses_a_bad_recipe_in_one_line_and_writes_nothing(launch, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "gpus: [1\n")
    r = launch("--recipe", str(bad), "--dry-run")
    assert r.returncode == 2 and r.stderr.startswith(f"error: recipe {bad} is not valid YAML (line")
    assert len(r.stderr.strip().splitlines()) == 1
    r = launch("--recipe", "demo", "--pair", "tiny-llama-tiny-qwen", "--dry-run")
    assert r.returncode == 2 and "--pair does not go with --recipe" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_expansion_seeds_deterministic_methods_once_and_the_command_line_wins(tmp_path):
    recipe = load_recipe("demo")
    assert set(recipe.methods) == set(METHODS)  # the demo runs every method
    request = LaunchRequest(cluster="local", runs_dir=str(tmp_path), name="d", overrides={"train": {"steps": 2}})
    root, runs, folders = recipe_runs(recipe, request)
    assert root == tmp_path / "d" and folders == {1: root}
    by = {}
    for r in runs:
        for m in r.methods:
            by.setdefault(m, []).append(r.seed)
    seeded = [m for m in METHODS if METHODS[m].seeded]
    assert all(by[m] == list(recipe.seeds) for m in seeded)
    assert all(by[m] == [recipe.seeds[0]] for m in METHODS if m not in seeded)
    assert len(runs) == 7 and all(r.plan.run.train.steps == 2 for r in runs)  # --steps over the recipe's 200
    # the evaluation-only methods ride on the bridge's runs: all of them at the first seed, k-shot at every seed
    hosts = [r for r in runs if r.methods[0] == "bridge"]
    assert [r.methods for r in hosts] == [
        ("bridge", "receiver_zero_shot", "sender_zero_shot", "receiver_k_shot", "text_relay", "receiver"),
        ("bridge", "receiver_k_shot"),
    ]
    assert all(r.plan.run.method == r.methods[0] and r.plan.run.eval.baselines == r.methods[1:] for r in runs)
    assert all(r.plan.run.eval.baselines == () for r in runs if r.methods[0] != "bridge")
    assert all(Path(r.plan.run.run_dir).parent == root for r in runs)
    assert len({r.plan.run.run_dir for r in runs}) == 7

    narrowed = with_cli(recipe, LaunchRequest(), "bridge,receiver", "7,8")
    _, runs, _ = recipe_runs(narrowed, LaunchRequest(cluster="local", runs_dir=str(tmp_path), name="e"))
    assert [(r.methods, r.seed) for r in runs] == [(("bridge", "receiver"), 7), (("bridge",), 8)]
    alone = with_cli(recipe, LaunchRequest(), "lora,receiver_k_shot,receiver", "7,8")  # no bridge to ride on
    _, runs, _ = recipe_runs(alone, LaunchRequest(cluster="local", runs_dir=str(tmp_path), name="f"))
    assert [(r.methods, r.seed) for r in runs] == [
        (("lora",), 7),
        (("lora",), 8),
        (("receiver_k_shot", "receiver"), 7),
        (("receiver_k_shot",), 8),
    ]
    with pytest.raises(UserError, match="--seeds"):
        with_cli(recipe, LaunchRequest(), None, "7,x")


def test_table1_dry_run_json_lists_every_job_with_resources_and_gpu_hours_without_torch(tmp_path):
    code = (
        "import sys; from launcher.cli import main; "
        "rc = main(['--recipe', 'table1', '--dry-run', '--json', '--name', 't1']); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print('IMPORTED', bad, file=sys.stderr); sys.exit(rc)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"TELEPATHY_RUNS": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stderr and not any(tmp_path.iterdir())  # no torch, nothing written
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and doc["recipe"]["name"] == "table1"
    (array,) = doc["arrays"]  # one GPU per run: one homogeneous layout, one array job
    tasks = array["tasks"]
    # per task: 5 seeds of bridge, prompt tuning and LoRA, the probe once; the baselines ride on the bridge runs
    assert len(tasks) == len(doc["runs"]) == 3 * (3 * 5 + 1)
    assert "#SBATCH --array=0-47%" in array["sbatch"]
    assert array["resources"]["nodes"] == 1 and array["resources"]["gpus_per_node"] == 1
    for task in ("sst2", "agnews", "trec"):
        mine = [t for t in tasks if t["task"] == task]
        for m in ("bridge", "prompt_tuning", "lora", "receiver_k_shot"):
            assert sorted(t["seed"] for t in mine if m in t["methods"]) == [42, 123, 456, 789, 1011]
        for m in ("linear_probe", "receiver_zero_shot", "sender_zero_shot", "text_relay", "receiver"):
            assert [t["seed"] for t in mine if m in t["methods"]] == [42]
    assert all(t["gpu_hours"] > 0 for t in tasks) and doc["gpu_hours"] == pytest.approx(
        sum(t["gpu_hours"] for t in tasks), abs=1e-2
    )
    assert "MFU" in doc["cost_basis"]
    run = doc["runs"][0]["run"]
    assert (run["method"], run["train"]["steps"], run["train"]["lr"], run["bridge"]["soft_tokens"]) == (
        "bridge",
        1500,
        2e-4,
        32,
    )
    assert run["bridge"]["source_layer"] == 31 and run["data"]["eval_samples"] is None
    assert doc["runs"][0]["batch"]["global_batch"] == 16
