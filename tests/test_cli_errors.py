"""Bad input to every subcommand: exit code 2, exactly one line `error: ...` on stderr naming the problem and
the fix, no traceback, nothing on stdout, nothing written (run folders, fixtures and config folders unchanged).

Most cases run in-process (launcher.cli.main, ~20 ms each); a few run in a fresh interpreter, proving what the
terminal shows and that torch is never imported on these paths."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from launcher.cli import main

OK = ["--pair", "llama3b-qwen3b", "--gpus", "4", "--dry-run"]
P = ["--pair", "llama3b-qwen3b"]
D = ["--dry-run"]

RUN_CASES = [
    # (id, argv, extra env, words the one-line message must contain)
    ("unknown-alias", ["--pair", "llama3b-qwen4b", "--dry-run"], {}, ["unknown model 'qwen4b'", "did you mean"]),
    ("typo-sender", ["--pair", "lama3b-qwen3b", "--dry-run"], {}, ["did you mean 'llama3b'"]),
    ("malformed-trailing-dash", ["--pair", "llama3b-", "--dry-run"], {}, ["malformed pair"]),
    ("malformed-leading-dash", ["--pair=-qwen3b", "--dry-run"], {}, ["malformed pair"]),
    ("malformed-space", ["--pair", "llama3b qwen3b", "--dry-run"], {}, ["malformed pair"]),
    ("empty-pair", ["--pair", "", "--dry-run"], {}, ["no model pair"]),
    ("unknown-pair", ["--pair", "gpt4-claude3", "--dry-run"], {}, ["unknown pair"]),
    ("no-pair", ["--gpus", "4", "--dry-run"], {}, ["no model pair"]),
    (
        "pair-and-sender",
        ["--pair", "llama3b-qwen3b", "--sender", "llama3b", "--dry-run"],
        {},
        ["either --pair or --sender"],
    ),
    ("unknown-sender", ["--sender", "llama9b", "--receiver", "qwen3b", "--dry-run"], {}, ["unknown model 'llama9b'"]),
    ("unknown-receiver", ["--sender", "llama3b", "--receiver", "qwen9b", "--dry-run"], {}, ["unknown model 'qwen9b'"]),
    (
        "missing-local-dir",
        ["--sender", "/nonexistent/model", "--receiver", "qwen3b", "--dry-run"],
        {},
        ["unknown model"],
    ),
    ("gpus-zero", ["--pair", "llama3b-qwen3b", "--gpus", "0", "--dry-run"], {}, ["--gpus", "must be >= 1"]),
    ("gpus-negative", ["--pair", "llama3b-qwen3b", "--gpus=-2", "--dry-run"], {}, ["--gpus", "must be >= 1"]),
    ("gpus-text", ["--pair", "llama3b-qwen3b", "--gpus", "four", "--dry-run"], {}, ["--gpus", "not a whole number"]),
    ("gpus-fraction", ["--pair", "llama3b-qwen3b", "--gpus", "1.5", "--dry-run"], {}, ["--gpus", "not a whole number"]),
    (
        "layout-12",
        ["--pair", "llama3b-qwen3b", "--gpus", "12", "--dry-run"],
        {},
        ["cannot be laid out", "multiple of 8"],
    ),
    ("layout-20", ["--pair", "llama3b-qwen3b", "--gpus", "20", "--dry-run"], {}, ["cannot be laid out", "1-8 GPUs"]),
    (
        "layout-env-gpn",
        ["--pair", "llama3b-qwen3b", "--gpus", "6", "--dry-run"],
        {"TELEPATHY_GPUS_PER_NODE": "4"},
        ["cannot be laid out on 4-GPU nodes"],
    ),
    (
        "unknown-backend",
        ["--pair", "llama3b-qwen3b", "--backend", "horovod", "--dry-run"],
        {},
        ["'horovod' is not one of ddp, fsdp, deepspeed"],
    ),
    (
        "zero-stage",
        ["--pair", "llama3b-qwen3b", "--backend", "deepspeed", "--zero-stage", "4", "--dry-run"],
        {},
        ["zero_stage must be 2 or 3"],
    ),
    (
        "unknown-cluster",
        ["--pair", "llama3b-qwen3b", "--cluster", "nope", "--dry-run"],
        {},
        ["cluster profile 'nope' not found"],
    ),
    (
        "env-bad-int",
        ["--pair", "llama3b-qwen3b", "--dry-run"],
        {"TELEPATHY_GPUS_PER_NODE": "eight"},
        ["TELEPATHY_GPUS_PER_NODE", "not a valid whole number"],
    ),
    (
        "flag-bad-float",
        ["--pair", "llama3b-qwen3b", "--gpu-memory-gb", "lots", "--dry-run"],
        {},
        ["--gpu-memory-gb", "not a valid number"],
    ),
    (
        "gpus-per-node-zero",
        ["--pair", "llama3b-qwen3b", "--gpus-per-node", "0", "--dry-run"],
        {},
        ["gpus_per_node must be positive"],
    ),
    (
        "weights-do-not-fit",
        ["--pair", "llama8b-mistral7b", "--gpu-memory-gb", "24", "--dry-run"],
        {},
        ["frozen weights alone need", "fsdp"],
    ),
    ("steps-zero", ["--pair", "llama3b-qwen3b", "--steps", "0", "--dry-run"], {}, ["--steps", "must be >= 1"]),
    ("lr-negative", ["--pair", "llama3b-qwen3b", "--lr=-1e-4", "--dry-run"], {}, ["--lr", "must be > 0"]),
    ("lr-text", ["--pair", "llama3b-qwen3b", "--lr", "fast", "--dry-run"], {}, ["--lr", "not a number"]),
    (
        "micro-batch-zero",
        ["--pair", "llama3b-qwen3b", "--micro-batch", "0", "--dry-run"],
        {},
        ["--micro-batch", "must be >= 1"],
    ),
    ("global-batch-text", ["--pair", "llama3b-qwen3b", "--global-batch", "big", "--dry-run"], {}, ["--global-batch"]),
    ("bad-name", ["--pair", "llama3b-qwen3b", "--name", "a/b", "--dry-run"], {}, ["run name", "not allowed"]),
    (
        "hostile-name",
        ["--pair", "llama3b-qwen3b", "--name", "x; rm -rf /", "--dry-run"],
        {},
        ["run name", "not allowed"],
    ),
    ("json-without-dry-run", ["--pair", "llama3b-qwen3b", "--json"], {}, ["--json goes with --dry-run"]),
    (
        "sweep-debug",
        ["--pair", "tiny-llama-tiny-qwen", "--debug", "--sweep", "seed=1,2"],
        {},
        ["--sweep runs as a SLURM array"],
    ),
    ("unknown-flag", ["--pair", "llama3b-qwen3b", "--frobnicate", "--dry-run"], {}, ["unrecognized arguments"]),
    ("debug-and-local", ["--pair", "llama3b-qwen3b", "--debug", "--local"], {}, ["not allowed with"]),
    (
        "missing-task",
        ["--pair", "llama3b-qwen3b", "--task", "no_such_task", "--dry-run"],
        {},
        ["unknown task 'no_such_task'"],
    ),
    (
        "missing-task-file",
        ["--pair", "llama3b-qwen3b", "--task", "/tmp/nope/data.jsonl", "--dry-run"],
        {},
        ["not found"],
    ),
]


# (id, argv, extra env, words the one-line message must contain); "{d}" is the shared fixture folder (FILES)
MORE_CASES = [
    # a plan larger than the cluster or its batch target: refused at planning, not 12,500 nodes printed
    ("huge-gpus", [*P, "--gpus", "100000", *D], {}, ["--gpus 100000 makes the global batch", "at most --gpus 48"]),
    ("recipe-huge-gpus", ["--recipe", "table1", "--gpus", "100000", *D], {}, ["global batch", "target 16"]),
    ("max-nodes", [*P, "--gpus", "16", "--max-nodes", "1", *D], {}, ["needs 2 nodes", "(max_nodes)", "--gpus 8"]),
    ("max-nodes-zero", [*P, "--max-nodes", "0", *D], {}, ["max_nodes must be positive or null"]),
    ("env-max-nodes", [*P, *D], {"TELEPATHY_MAX_NODES": "one"}, ["TELEPATHY_MAX_NODES", "not a valid whole number"]),
    # profile overrides
    ("time-limit-text", [*P, "--time-limit-min", "abc", *D], {}, ["--time-limit-min='abc'", "whole number"]),
    ("time-limit-zero", [*P, "--time-limit-min", "0", *D], {}, ["time_limit_min must be positive"]),
    ("partition-percent", [*P, "--partition", "a b%", *D], {}, ["partition 'a b%'", "cannot go into an sbatch"]),
    ("account-newline", [*P, "--account", "x\ny", *D], {}, ["account", "control character"]),
    ("exclusive-maybe", [*P, "--exclusive", "maybe", *D], {}, ["--exclusive='maybe'", "true/false"]),
    ("device-tpu", [*P, "--device", "tpu", *D], {}, ["device must be cuda or cpu"]),
    ("runtime-docker", [*P, "--container-runtime", "docker", *D], {}, ["container_runtime must be one of pyxis"]),
    ("sbatch-reserved", [*P, "--sbatch-args=--nodes=3", *D], {}, ["sbatch_args may not set --nodes"]),
    ("sbatch-dash-value", [*P, "--sbatch-args", "--comment=x", *D], {}, ["expected one argument", "--flag=VALUE"]),
    ("sbatch-unclosed", [*P, "--sbatch-args", "'x", *D], {}, ["--sbatch-args", "not a valid argument list"]),
    ("srun-secret", [*P, "--srun-args=--export=ALL,HF_TOKEN=hf_x1", *D], {}, ["srun_args sets HF_TOKEN", "shell"]),
    ("gpu-type-count", [*P, "--gpu-type", "h100:8", *D], {}, ["gpu_type 'h100:8' is not a GRES type name"]),
    ("cpus-below-gpus", [*P, "--cpus-per-node", "2", *D], {}, ["cpus_per_node (2) is below gpus_per_node"]),
    ("max-restarts-negative", [*P, "--max-restarts=-1", *D], {}, ["max_restarts must be 0 or more"]),
    # --sweep
    ("sweep-no-values", [*P, "--sweep", "seed", *D], {}, ["--sweep 'seed' is not KEY=V1,V2"]),
    ("sweep-unknown-key", [*P, "--sweep", "colour=red,blue", *D], {}, ["--sweep key 'colour' is unknown"]),
    ("sweep-bad-value", [*P, "--sweep", "lr=abc,1e-4", *D], {}, ["--sweep lr: bad value 'abc'"]),
    ("sweep-repeated", [*P, "--sweep", "seed=1,1", *D], {}, ["repeated value"]),
    ("sweep-twice", [*P, "--sweep", "seed=1,2", "--sweep", "seed=3", *D], {}, ["--sweep seed given twice"]),
    ("sweep-unknown-pair", [*P, "--sweep", "pair=llama3b-qwen9b", *D], {}, ["unknown model 'qwen9b'"]),
    ("sweep-unknown-task", [*P, "--sweep", "task=sst2,nope", *D], {}, ["unknown task 'nope'"]),
    # --recipe
    ("recipe-unknown", ["--recipe", "nope", *D], {}, ["recipe 'nope' not found", "available: "]),
    ("recipe-and-pair", ["--recipe", "table1", *P, *D], {}, ["--pair does not go with --recipe"]),
    ("recipe-bad-method", ["--recipe", "table1", "--methods", "nomethod", *D], {}, ["unknown method 'nomethod'"]),
    ("recipe-bad-seeds", ["--recipe", "table1", "--seeds", "x,y", *D], {}, ["--seeds 'x,y'", "whole numbers"]),
    ("recipe-empty-seeds", ["--recipe", "table1", "--seeds", "", *D], {}, ["--seeds is empty"]),
    ("methods-without-recipe", [*P, "--methods", "bridge", *D], {}, ["add --recipe NAME"]),
    ("recipe-unknown-key", ["--recipe", "{d}/r2.yaml", *D], {}, ["colour: unknown key; known: "]),
    # run settings
    ("method-unknown", [*P, "--method", "telepathy", *D], {}, ["'telepathy' is not one of bridge"]),
    ("precision-fp8", [*P, "--precision", "fp8", *D], {}, ["'fp8' is not one of"]),
    ("seed-text", [*P, "--seed", "x", *D], {}, ["--seed: invalid int value"]),
    ("max-length-huge", [*P, "--max-length", "99999999", *D], {}, ["not even micro-batch 1 fits", "--max-length"]),
    ("source-layer", [*P, "--source-layer", "999", *D], {}, ["source_layer 999 is outside"]),
    ("baselines", [*P, "--baselines", "nonsense", *D], {}, ["unknown baseline 'nonsense'"]),
    ("empty-name", [*P, "--name", "", *D], {}, ["run name '' is not allowed"]),
    # where things go: a file where a folder belongs
    ("runs-dir-file", [*P, "--runs-dir", "{d}/file", *D], {}, ["runs folder", "is a file; pass a folder"]),
    ("runs-env-file", [*P, *D], {"TELEPATHY_RUNS": "{d}/file"}, ["(--runs-dir or TELEPATHY_RUNS) is a file"]),
    ("debug-runs-dir-file", ["--pair", "tiny-llama-tiny-qwen", "--debug", "--runs-dir", "{d}/file"], {}, ["a file"]),
    ("config-dir-file", ["--config-dir", "{d}/file", *P, *D], {}, ["configuration folder", "is a file"]),
    ("config-env-file", ["status", "x"], {"TELEPATHY_CONFIG_DIR": "{d}/file"}, ["configuration folder"]),
    ("config-dir-no-value", ["--config-dir"], {}, ["--config-dir needs a folder"]),
    # cluster profiles and the user's configuration folder (TELEPATHY_CONFIG_DIR / --config-dir)
    ("profile-bad-yaml", [*P, "--cluster", "{d}/clusters/broken.yaml", *D], {}, ["not valid YAML (line 2)"]),
    ("profile-a-list", [*P, "--cluster", "{d}/clusters/list.yaml", *D], {}, ["must be a mapping of fields"]),
    (
        "profile-text-int",
        [*P, "--cluster", "{d}/clusters/text.yaml", *D],
        {},
        ["gpus_per_node: 'eight' is not a whole"],
    ),
    ("profile-secret-env", [*P, "--cluster", "{d}/clusters/secret.yaml", *D], {}, ["env HF_TOKEN looks like a secret"]),
    ("profile-secret-setup", [*P, "--cluster", "{d}/clusters/setup.yaml", *D], {}, ["setup sets WANDB_API_KEY"]),
    ("user-profile-yaml", ["--config-dir", "{d}/uc-cluster", *P, "--cluster", "broken", *D], {}, ["not valid YAML"]),
    ("user-task-yaml", ["--config-dir", "{d}/uc-task", *P, "--task", "mytask", *D], {}, ["mytask.yaml", "YAML"]),
    ("user-recipe-yaml", ["--config-dir", "{d}/uc-recipe", "--recipe", "r1", *D], {}, ["recipe", "not valid YAML"]),
    ("user-models", [*P, *D], {"TELEPATHY_CONFIG_DIR": "{d}/uc-models"}, ["models.yaml: model 'x'", "fix the entry"]),
    ("user-table-yaml", [*P, *D], {"TELEPATHY_CONFIG_DIR": "{d}/uc-table"}, ["memory_table.yaml", "not valid YAML"]),
    ("env-cluster", [*P, *D], {"TELEPATHY_CLUSTER": "nope"}, ["cluster profile 'nope' not found"]),
    ("env-offline", [*P, *D], {"TELEPATHY_OFFLINE": "maybe"}, ["TELEPATHY_OFFLINE='maybe'", "true/false"]),
    ("env-srun-args", [*P, *D], {"TELEPATHY_SRUN_ARGS": "'x"}, ["TELEPATHY_SRUN_ARGS", "argument list"]),
    ("env-empty-int", [*P, *D], {"TELEPATHY_GPUS_PER_NODE": ""}, ["TELEPATHY_GPUS_PER_NODE=''"]),
    # memory
    ("memory-no-pair", ["memory"], {}, ["no model pair given"]),
    ("memory-unknown-model", ["memory", "--pair", "llama3b-qwen9b"], {}, ["unknown model 'qwen9b'"]),
    ("memory-quick-alone", ["memory", *P, "--quick"], {}, ["--quick shortens --measure"]),
    ("memory-trace-measure", ["memory", *P, "--trace", "--measure"], {}, ["not allowed with argument --trace"]),
    ("memory-measure-fsdp", ["memory", *P, "--measure", "--backend", "fsdp"], {}, ["drop --backend"]),
    ("memory-cluster", ["memory", *P, "--cluster", "nope"], {}, ["cluster profile 'nope' not found"]),
    # status, logs, cancel, resubmit: missing, damaged and unreadable run folders
    ("status-no-target", ["status"], {}, ["required: RUN_OR_SWEEP"]),
    ("status-nothing", ["status", "{d}/nothing"], {}, ["no submitted run or sweep", "pass the folder"]),
    ("status-empty-folder", ["status", "{d}/empty"], {}, ["no submitted run or sweep"]),
    ("status-bad-json", ["status", "{d}/badjson"], {}, ["jobs.json is not valid JSON", "restore or remove it"]),
    ("status-wrong-shape", ["status", "{d}/wrongshape"], {}, ["jobs.json is damaged (KeyError: 'root')"]),
    ("status-a-list", ["status", "{d}/alist"], {}, ["jobs.json is damaged (TypeError"]),
    ("status-jobs-a-folder", ["status", "{d}/jobsdir"], {}, ["no submitted run or sweep"]),
    ("status-task-range", ["status", "{d}/sweep", "--task", "5"], {}, ["no task 5", "tasks are 0-1"]),
    ("status-task-text", ["status", "{d}/sweep", "--task", "x"], {}, ["--task: invalid int value"]),
    ("logs-of-a-sweep", ["logs", "{d}/sweep"], {}, ["sweep of 2 tasks; pick one with --task I (0-1)"]),
    ("logs-never-submitted", ["logs", "{d}/sweep", "--task", "0"], {}, ["was never submitted"]),
    ("logs-node-text", ["logs", "{d}/sweep", "--task", "0", "--node", "x"], {}, ["--node: invalid int value"]),
    ("cancel-nothing", ["cancel", "{d}/nothing"], {}, ["no submitted run or sweep"]),
    ("cancel-task-range", ["cancel", "{d}/sweep", "--task", "9"], {}, ["no task 9"]),
    ("resubmit-bad-json", ["resubmit", "{d}/badjson"], {}, ["not valid JSON"]),
    ("resubmit-task-range", ["resubmit", "{d}/sweep", "--task", "7"], {}, ["no task 7"]),
    # report
    ("report-no-target", ["report"], {}, ["required: RUN_OR_SWEEP"]),
    ("report-nothing", ["report", "{d}/nothing"], {}, ["is not a folder"]),
    ("report-empty", ["report", "{d}/empty"], {}, ["holds no run folders"]),
    ("report-broken-config", ["report", "{d}/rep"], {}, ["config.json is not valid JSON"]),
    ("report-extra-seeds-zero", ["report", "{d}/empty", "--extra-seeds", "0"], {}, ["--extra-seeds: 0 must be >= 1"]),
    # prefetch
    ("prefetch-nothing", ["prefetch"], {}, ["nothing to prefetch"]),
    ("prefetch-unknown-model", ["prefetch", "--pair", "llama3b-qwen9b"], {}, ["unknown model 'qwen9b'"]),
    ("prefetch-unknown-task", ["prefetch", "--task", "nope", "--check"], {}, ["unknown task 'nope'"]),
    ("prefetch-unknown-recipe", ["prefetch", "--recipe", "nope", "--check"], {}, ["recipe 'nope' not found"]),
    ("prefetch-sweep-key", ["prefetch", *P, "--sweep", "colour=1", "--check"], {}, ["--sweep key 'colour'"]),
    ("prefetch-cluster", ["prefetch", *P, "--check", "--cluster", "nope"], {}, ["cluster profile 'nope'"]),
    # other subcommands
    ("models-flag", ["models", "--frobnicate"], {}, ["unrecognized arguments: --frobnicate"]),
    ("run-dangling-flag", ["--pair"], {}, ["--pair: expected one argument"]),
]
CASES = RUN_CASES + MORE_CASES


def _tree(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for r in roots for p in r.rglob("*")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Shared inputs: damaged run folders, bad profiles, bad user configuration folders, a file where a folder
    belongs. Built once; every case checks it is unchanged."""
    d = tmp_path_factory.mktemp("bad-input")
    write = {
        "file": "x",
        "badjson/jobs.json": "{not json",
        "wrongshape/jobs.json": '{"kind": "run"}',
        "alist/jobs.json": "[1, 2]",
        "jobsdir/jobs.json/x": "",
        "rep/r1/config.json": "{broken",
        "r2.yaml": "colour: blue\n",
        "clusters/broken.yaml": "gpus_per_node: [8\n",
        "clusters/list.yaml": "- 1\n- 2\n",
        "clusters/text.yaml": "gpus_per_node: eight\ngpu_memory_gb: 80\n",
        "clusters/secret.yaml": "gpus_per_node: 8\ngpu_memory_gb: 80\nenv: {HF_TOKEN: hf_planted1}\n",
        "clusters/setup.yaml": "gpus_per_node: 8\ngpu_memory_gb: 80\nsetup: ['export WANDB_API_KEY=planted2']\n",
        "uc-cluster/clusters/broken.yaml": "gpus_per_node: [8\n",
        "uc-task/tasks/mytask.yaml": "labels: [a\n",
        "uc-recipe/recipes/r1.yaml": "pairs: [\n",
        "uc-models/models.yaml": "models: {x: 3}\n",
        "uc-table/memory_table.yaml": "rows: [\n",
    }
    for rel, text in write.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    (d / "empty").mkdir()
    tasks = [{"index": i, "name": f"t{i}", "run_dir": str(d / "sweep" / f"t{i}"), "jobs": []} for i in range(2)]
    (d / "sweep").mkdir()
    (d / "sweep" / "jobs.json").write_text(json.dumps({"root": str(d / "sweep"), "kind": "sweep", "tasks": tasks}))
    return d


@pytest.fixture
def cli(files, tmp_path, monkeypatch, capsys):
    """launcher.cli.main in this process, as a shell would call it: an empty user configuration folder, the runs
    folder under tmp_path, no TELEPATHY_CLUSTER; returns (rc, stdout, stderr) and checks nothing was written."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.chdir(tmp_path)  # a stray relative write lands where the check sees it
    monkeypatch.setenv("TELEPATHY_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("TELEPATHY_CONFIG_DIR", str(home))  # restored after, whatever --config-dir sets
    monkeypatch.delenv("TELEPATHY_CLUSTER", raising=False)

    def run(argv, env):
        for key, value in env.items():
            monkeypatch.setenv(key, value.format(d=files))
        before = _tree(files, tmp_path)
        rc = main([a.format(d=files) for a in argv])
        out, err = capsys.readouterr()
        assert _tree(files, tmp_path) == before, "something was written"
        return rc, out, err

    return run


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, case):
    _, argv, env, needles = case
    rc, out, err = cli(argv, env)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), (rc, out, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "planted" not in err and "hf_x1" not in err  # a refused secret is named, its value never shown


def test_ids_are_unique_and_every_subcommand_is_covered():
    from launcher.cli import COMMANDS

    assert len({c[0] for c in CASES}) == len(CASES) > 60
    first = {next((a for a in c[1] if a in COMMANDS), "run") for c in CASES}
    assert first == set(COMMANDS), set(COMMANDS) - first


def _configs_copy(tmp_path):
    dst = tmp_path / "configs"
    shutil.copytree(REPO / "configs", dst)
    return dst


@pytest.mark.parametrize(
    "target,content,needle",
    [
        ("models.yaml", None, "model registry"),
        ("models.yaml", "models: [unclosed\n", "not valid YAML"),
        ("models.yaml", "families: {}\nmodels: {x: {family: llama}}\n", "model 'x'"),
        ("memory_table.yaml", None, "memory table"),
        ("memory_table.yaml", "rows: [\n", "not valid YAML"),
        (
            "memory_table.yaml",
            "rows:\n  - {sender: llama3b, receiver: qwen3b, micro_batch: 6, grad_accum: 2, effective_batch: 13,"
            " gpu_memory_gb: 80, seq_len: 1536, dtype: bf16, backend: ddp, provenance: x}\n",
            "effective_batch",
        ),
        ("memory_table.yaml", "rows:\n  - {sender: llama3b, color: blue}\n", "row 1"),
        ("clusters/dgx-h100.yaml", "gpus_per_node: [8\n", "not valid YAML"),
        ("clusters/dgx-h100.yaml", "gpus_per_node: 8\ngpu_memory_gb: 80\nwarp_drive: on\n", "unknown field"),
    ],
)
def test_missing_or_malformed_shipped_config_files(cli, tmp_path, target, content, needle):
    configs = _configs_copy(tmp_path)
    if content is None:
        (configs / target).unlink()
    else:
        (configs / target).write_text(content)
    rc, out, err = cli(OK, {"TELEPATHY_CONFIGS": str(configs)})
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


# A fresh interpreter: what the terminal shows (no traceback, one line) and that torch stays out.
_FRESH = (
    "import sys; from launcher.cli import main; rc = main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(rc)"
)
FRESH = ["huge-gpus", "status-wrong-shape", "user-recipe-yaml", "memory-quick-alone", "profile-secret-env"]


@pytest.fixture(scope="module")
def fresh(files, tmp_path_factory):
    """The FRESH cases, started together (independent interpreters overlap): id -> (process result, runs folder)."""
    started = {}
    for name, argv, env, _ in (c for c in CASES if c[0] in FRESH):
        tmp = tmp_path_factory.mktemp(name)
        e = {**os.environ, "TELEPATHY_RUNS": str(tmp / "runs"), "TELEPATHY_CONFIG_DIR": str(tmp / "home")}
        e.pop("TELEPATHY_CLUSTER", None)
        e.update({k: v.format(d=files) for k, v in env.items()})
        e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
        cmd = [sys.executable, "-c", _FRESH, *(a.format(d=files) for a in argv)]
        started[name] = (subprocess.Popen(cmd, stdout=-1, stderr=-1, text=True, cwd=tmp, env=e), tmp / "runs")
    return {name: (p.communicate(timeout=120), p.returncode, runs) for name, (p, runs) in started.items()}


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in FRESH], ids=FRESH)
def test_in_a_fresh_interpreter_no_traceback_and_no_torch(fresh, case):
    name, _, _, needles = case
    (stdout, stderr), rc, runs = fresh[name]
    assert rc == 2 and stdout == "False\n", (stdout, stderr)
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and needles[0] in stderr
    assert not runs.exists()
