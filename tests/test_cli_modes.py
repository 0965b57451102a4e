"""The CLI's local modes run the real worker: --debug in-process, --local under torchrun --standalone."""

import json

import pytest

FAST = [
    "--pair",
    "tiny-llama-tiny-qwen",
    "--task",
    "demo",
    "--steps",
    "4",
    "--eval-samples",
    "8",
    "--baselines",
    "receiver",
    "--latency-samples",
    "0",
]


@pytest.mark.parametrize("mode,gpus", [("--debug", "1"), ("--local", "2")])
def test_local_modes_train_checkpoint_and_evaluate(launch, tmp_path, mode, gpus):
    r = launch(*FAST, mode, "--gpus", gpus, "--name", "m", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = tmp_path / "runs" / "m"
    plan = json.loads((run / "plan.json").read_text())
    assert plan["mode"] == mode.lstrip("-") and plan["layout"]["world_size"] == int(gpus)
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004"]
    assert set(json.loads((run / "eval.json").read_text())["methods"]) == {"bridge", "receiver"}
    assert json.loads((run / "manifest.json").read_text())["exit"] == {"state": "completed"}
    assert {p.name for p in (run / "logs").glob("worker_rank*.log")} == {
        f"worker_rank{i}.log" for i in range(int(gpus))
    }
    assert "task demo: n=8" in r.stdout


def test_the_same_run_name_is_refused_not_overwritten(launch, tmp_path):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "plan.json").write_text("{}")
    r = launch(*FAST, "--debug", "--name", "taken")
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (tmp_path / "runs" / "taken" / "plan.json").read_text() == "{}"
