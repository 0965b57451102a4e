"""RUN/manifest.json: code version (checkout, snapshot, no git), SLURM ids, exit states, requeues, no secrets."""

import json
import subprocess

import pytest

from launcher.plan import make_plan
from launcher.profiles import load_profile
from telepathy import manifest
from telepathy.config import RunConfig
from telepathy.registry import load_registry


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    repo = tmp_path / "code"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return repo, head


# A cluster profile refuses secrets (launcher/profiles.py); a plan.json that holds some anyway (hand-edited, or
# written before that check) must still not pass them on to the manifest.
PROFILE_SECRETS = {
    "env": {"HUGGING_FACE_HUB_TOKEN": "hf_PROFILEsecret1", "OMP_NUM_THREADS": "1"},
    "setup": ["module load cuda", "export COMET_API_KEY=PROFILEsecret2"],
}


@pytest.fixture
def run_cfg(tmp_path):
    """A real plan for tiny-llama -> tiny-qwen written as `launch --debug` writes it, secrets planted in it."""
    pair = load_registry().pair("tiny-llama-tiny-qwen")
    cfg = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir=str(tmp_path / "run"), name="m")
    plan = make_plan(pair, cfg, gpus=1, profile=load_profile("local"), mode="debug")
    plan.write()
    d = json.loads(plan.run.dir.plan.read_text())
    d["profile"].update(PROFILE_SECRETS)
    plan.run.dir.plan.write_text(json.dumps(d))
    return plan.run


def test_code_version_of_a_checkout_clean_then_dirty(checkout):
    repo, head = checkout
    v = manifest.code_version(repo)
    assert (v["commit"], v["dirty"], v["source"]) == (head, False, "git")
    (repo / "a.py").write_text("x = 2\n")
    assert manifest.code_version(repo)["dirty"] is True


def test_snapshot_carries_the_checkouts_commit(checkout, tmp_path):
    repo, head = checkout
    (repo / "a.py").write_text("x = 3\n")  # dirty at snapshot time
    snap = tmp_path / "snapshot"
    snap.mkdir()
    manifest.record_code_version(repo, snap)
    v = manifest.code_version(snap)
    assert (v["commit"], v["dirty"], v["source"]) == (head, True, "snapshot")


def test_no_git_binary_never_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    expected = {"commit": None, "dirty": None, "source": "unknown", "path": str(tmp_path)}
    assert manifest.code_version(tmp_path) == expected


def test_manifest_records_run_and_never_secrets(run_cfg, monkeypatch):
    secrets = {
        "HF_TOKEN": "hf_SECRETtoken123",
        "GITHUB_TOKEN": "ghp_SECRET456",
        "WANDB_API_KEY": "SECRETkey789",
        "AWS_SECRET_ACCESS_KEY": "SECRETaws000",
        "DB_PASSWORD": "SECRETpw111",
        "MY_PASSWD": "SECRETpw222",
    }
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_ARRAY_JOB_ID": "4240",
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_RESTART_COUNT": "0",
    }
    for k, v in {**secrets, **slurm}.items():
        monkeypatch.setenv(k, v)
    manifest.start(run_cfg)
    manifest.finish(run_cfg.run_dir, "completed")
    text = run_cfg.dir.manifest.read_text()
    for name, value in secrets.items():
        assert value not in text and name not in text
    assert "PROFILEsecret" not in text and "hf_PROFILE" not in text
    assert "module load cuda" in text and '"OMP_NUM_THREADS": "1"' in text  # the rest of the plan is kept
    m = json.loads(text)
    assert m["slurm"] == slurm
    assert RunConfig.from_dict(m["config"]) == run_cfg
    assert m["plan"]["batch"]["micro_batch"] == run_cfg.train.micro_batch
    assert m["memory_plan"]["batch_source"] in ("table", "estimate")
    assert m["memory_plan"]["estimate_gib"] == pytest.approx(run_cfg.predicted_peak_gib, abs=1e-3)
    assert m["software"]["python"] and m["software"]["torch"] and m["software"]["transformers"]
    assert m["hardware"]["cpu"] and m["host"]
    assert m["exit"] == {"state": "completed"} and m["ended_at"] >= m["started_at"]
    assert m["code"]["source"] in ("git", "snapshot", "unknown")


def test_failed_then_requeued_then_preempted(run_cfg, monkeypatch):
    class Preempted(Exception):
        pass

    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(ValueError):
        with manifest.recorded(run_cfg, preempted=(Preempted,)):
            raise ValueError("boom with a /secret/path in it")
    m = manifest.load(run_cfg.run_dir)
    assert m["exit"] == {"state": "failed", "error_type": "ValueError"}
    assert "/secret/path" not in json.dumps(m)

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(Preempted):
        with manifest.recorded(run_cfg, preempted=(Preempted,)):
            raise Preempted()
    m = manifest.load(run_cfg.run_dir)
    assert m["exit"] == {"state": "preempted"}
    assert [a["exit"]["state"] for a in m["attempts"]] == ["failed", "preempted"]
    assert [a["slurm"]["SLURM_RESTART_COUNT"] for a in m["attempts"]] == ["0", "1"]


def test_only_rank_zero_writes(run_cfg):
    with manifest.recorded(run_cfg, enabled=False):
        pass
    assert manifest.load(run_cfg.run_dir) is None
