"""Bad input: exit code 2, one line naming the problem and the fix, no traceback, nothing written."""

import shutil

import pytest
from conftest import REPO

OK = ["--pair", "llama3b-qwen3b", "--gpus", "4", "--dry-run"]

CASES = [
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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(launch, tmp_path, case):
    _, argv, env, needles = case
    r = launch(*argv, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "runs").exists()


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
def test_missing_or_malformed_config_files(launch, tmp_path, target, content, needle):
    configs = _configs_copy(tmp_path)
    if content is None:
        (configs / target).unlink()
    else:
        (configs / target).write_text(content)
    r = launch(*OK, env={"TELEPATHY_CONFIGS": str(configs)})
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()
