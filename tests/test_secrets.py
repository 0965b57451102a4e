"""The one secret predicate (telepathy/secrets.py) and each writer that uses it: cluster profiles (so plans
and job scripts), node log lines, worker log lines (manifests: tests/test_manifest.py)."""

import logging

import pytest

from launcher.node import SlurmTask, _log
from launcher.profiles import load_profile
from telepathy.errors import UserError
from telepathy.secrets import REDACTED, RedactingFilter, is_secret_name, literal_secret_assignments, redact

SECRET = [
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "GITHUB_TOKEN",
    "AWS_SESSION_TOKEN",
    "hfToken",
    "WANDB_API_KEY",
    "HF_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "CLIENT_SECRET",
    "apiKey",
    "MY_PASSWORD",
    "MYSQL_PASSWD",
    "DB_PASS",
    "SSH_PASSPHRASE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GITHUB_PAT",
    "token",
]
NOT_SECRET = [
    "TOKENIZERS_PARALLELISM",  # tokenizers' thread switch: it holds no token
    "MAX_NEW_TOKENS",
    "soft_tokens",
    "KEYBOARD_LAYOUT",
    "MONKEY",
    "PATH",
    "PWD",  # the working folder
    "OLDPWD",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "OMP_NUM_THREADS",
    "SSH_AUTH_SOCK",
    "BYPASS_CACHE",
    "SLURM_JOB_ID",
]


def test_what_is_secret_is_decided_by_its_name():
    assert [n for n in SECRET if not is_secret_name(n)] == []
    assert [n for n in NOT_SECRET if is_secret_name(n)] == []


def test_redact_keys_and_assignments_and_nothing_else():
    doc = {"env": {"HF_TOKEN": "hf_x", "TOKENIZERS_PARALLELISM": "false"}, "soft_tokens": 32, "setup": ["a B=1"]}
    doc["setup"].append("export WANDB_API_KEY='k y' DB_PASS=p HF_HOME=/h")
    assert redact(doc) == {
        "env": {"HF_TOKEN": REDACTED, "TOKENIZERS_PARALLELISM": "false"},
        "soft_tokens": 32,
        "setup": ["a B=1", f"export WANDB_API_KEY={REDACTED} DB_PASS={REDACTED} HF_HOME=/h"],
    }


def test_a_literal_secret_assignment_is_found_a_reference_is_not():
    assert literal_secret_assignments("export HF_TOKEN=hf_abc; export B=1") == ["HF_TOKEN"]
    assert literal_secret_assignments("--export=ALL,WANDB_API_KEY=k") == ["WANDB_API_KEY"]
    assert literal_secret_assignments('export HF_TOKEN="$(cat ~/.hf_token)" GH_PAT=$GH_PAT_RO') == []


def _profile_with(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text("gpus_per_node: 4\ngpu_memory_gb: 80\n" + text)
    return load_profile(str(path), environ={})


@pytest.mark.parametrize(
    "text,where",
    [
        ("env: {HF_TOKEN: hf_abc}\n", "env HF_TOKEN looks like a secret"),
        ("setup: ['export WANDB_API_KEY=abc123']\n", "setup sets WANDB_API_KEY"),
        ("sbatch_args: ['--export=ALL,HF_TOKEN=hf_abc']\n", "sbatch_args sets HF_TOKEN"),
        ("srun_args: ['--export=ALL,DB_PASS=pw']\n", "srun_args sets DB_PASS"),
    ],
)
def test_a_profile_that_would_write_a_secret_is_refused(tmp_path, text, where):
    with pytest.raises(UserError, match=where):
        _profile_with(tmp_path, text)


def test_a_profile_may_read_secrets_at_run_time(tmp_path):
    prof = _profile_with(
        tmp_path, "setup: ['export HF_TOKEN=$(cat ~/.hf_token)']\nenv: {TOKENIZERS_PARALLELISM: 'false'}\n"
    )
    assert prof.env == {"TOKENIZERS_PARALLELISM": "false"}


def test_node_and_worker_log_lines_are_redacted(capsys):
    _log(SlurmTask("7", "7", 0, 1, "n1", 0), "torchrun --x HF_TOKEN=hf_abc")
    assert capsys.readouterr().out.endswith(f"torchrun --x HF_TOKEN={REDACTED}\n")
    record = logging.LogRecord("w", logging.INFO, __file__, 1, "env %s", ("AWS_SECRET_ACCESS_KEY=abc",), None)
    assert RedactingFilter().filter(record) and record.getMessage() == f"env AWS_SECRET_ACCESS_KEY={REDACTED}"
