"""The first real run, rehearsed offline: models by hub id and tasks by dataset repo, read from a cache in the
Hugging Face hub's own layout (tests/hubcache.py) with every network variable set offline, exactly as on a
compute node without internet. `launch prefetch --check`, --debug, --local, the preflight that refuses a run
whose files are not cached, and every shipped task loading from its parquet files. (The SLURM job on the same
cache: tests/slurm/test_slurm_jobs.py; the non-editable wheel: tests/test_package.py.)"""

import json
import shutil

import pytest
from hubcache import offline_env

from telepathy.config import DataConfig
from telepathy.data import load_task, task_names
from telepathy.rundir import RunDir

PAIR = "rehearse-llama-rehearse-qwen"
RUN = [
    "--pair",
    PAIR,
    "--task",
    "sst2",
    "--steps",
    "4",
    "--eval-samples",
    "8",
    "--baselines",
    "receiver,sender_zero_shot",  # the full sender: completed from the cached safetensors, offline
    "--latency-samples",
    "0",
    "--max-length",
    "48",
]


def test_prefetch_check_finds_everything_and_names_what_is_missing(launch, hub_cache, tmp_path):
    env = offline_env(hub_cache)
    r = launch("prefetch", "--pair", PAIR, "--task", "sst2", "--task", "trec", "--check", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cache"] == str(hub_cache[0] / "hub") and out["fix"] is None
    assert [(i["what"], i["present"]) for i in out["items"]] == [
        ("model rehearse-llama", True),
        ("model rehearse-qwen", True),
        ("task sst2", True),
        ("task trec", True),
    ]
    assert all(i["bytes"] > 0 for i in out["items"])

    # a damaged copy: one model's weights and one task's eval split gone
    damaged = shutil.copytree(hub_cache[0], tmp_path / "hf", symlinks=True)
    for snap in (damaged / "hub").glob("models--telepathy-test--tiny-qwen/snapshots/*"):
        (snap / "model.safetensors").unlink()
    for snap in (damaged / "hub").glob("datasets--nyu-mll--glue/snapshots/*"):
        for f in snap.glob("sst2/validation-*"):
            f.unlink()
    r = launch("prefetch", "--pair", PAIR, "--task", "sst2", "--check", env={**env, "HF_HOME": str(damaged)})
    assert r.returncode == 1
    assert "MISSING  model rehearse-qwen" in r.stdout and "model.safetensors" in r.stdout
    assert "MISSING  task sst2" in r.stdout and "eval: sst2/validation-*.parquet" in r.stdout
    assert "launch prefetch --model rehearse-qwen --task sst2" in r.stdout


@pytest.mark.parametrize("mode,gpus", [("--debug", "1"), ("--local", "2")])
def test_local_modes_load_by_hub_id_offline_train_and_evaluate(launch, hub_cache, tmp_path, mode, gpus):
    r = launch(
        *RUN, mode, "--gpus", gpus, "--name", "m", env={**offline_env(hub_cache), "OMP_NUM_THREADS": "1"}, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = RunDir(tmp_path / "runs" / "m")
    plan = json.loads(run.plan.read_text())
    assert plan["mode"] == mode.lstrip("-") and plan["layout"]["world_size"] == int(gpus)
    assert plan["run"]["sender"] == "rehearse-llama" and plan["run"]["data"]["task"] == "sst2"
    assert [d.step for d in run.step_dirs()] == [4]
    ev = json.loads(run.eval.read_text())
    assert (
        set(ev["methods"]) == {"bridge", "receiver", "sender_zero_shot"}
        and ev["n"] == 8
        and ev["labels"] == ["negative", "positive"]
    )
    assert json.loads(run.manifest.read_text())["exit"] == {"state": "completed"}
    assert {p.name for p in run.logs.glob("worker_rank*.log")} == {run.worker_log(i).name for i in range(int(gpus))}
    assert "task sst2: n=8" in r.stdout


@pytest.mark.parametrize("mode", ["--debug", "--slurm"])
def test_preflight_refuses_a_run_whose_model_is_not_cached_and_writes_nothing(launch, hub_cache, tmp_path, mode):
    r = launch(
        "--pair",
        "rehearse-llama-rehearse-mistral",
        "--task",
        "sst2",
        mode,
        "--cluster",
        "local",
        "--name",
        "x",
        env=offline_env(hub_cache),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(
        "error: model rehearse-mistral (model telepathy-test/tiny-mistral@main) is not in the "
        f"Hugging Face cache {hub_cache[0] / 'hub'}"
    )
    assert line.endswith("launch prefetch --model rehearse-mistral --cluster local")
    assert not (tmp_path / "runs").exists()


def test_the_same_run_name_is_refused_not_overwritten(launch, tmp_path):
    taken = RunDir(tmp_path / "runs" / "taken")
    taken.path.mkdir(parents=True)
    taken.plan.write_text("{}")
    r = launch("--pair", "tiny-llama-tiny-qwen", "--task", "demo", "--debug", "--name", "taken")
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert taken.plan.read_text() == "{}"


@pytest.mark.parametrize("task", [t for t in task_names() if t != "demo"])
def test_every_shipped_task_loads_from_its_parquet_files_offline(task, hub_cache, monkeypatch):
    for k, v in offline_env(hub_cache).items():
        monkeypatch.setenv(k, v)
    t = load_task(DataConfig(task=task, eval_samples=None))
    assert (len(t.train), len(t.eval)) == (64, 16)
    assert {e.label for e in t.train} == set(range(min(64, len(t.spec.labels))))
    if task == "boolq":  # a second prompt field, filled per example
        assert t.train[0].extra["question"].startswith("is it about") and "{question}" not in t.spec.sender_text(
            t.train[0].text, t.train[0].extra
        )


def test_a_label_order_that_contradicts_the_dataset_is_one_line(hub_cache, monkeypatch, tmp_path):
    """The original's TREC spec swapped DESC and ENTY; the dataset's ClassLabel names catch that."""
    from telepathy.data import load_spec
    from telepathy.errors import UserError
    from telepathy.paths import configs_dir

    for k, v in offline_env(hub_cache).items():
        monkeypatch.setenv(k, v)
    text = load_spec("trec").prompt
    swapped = tmp_path / "config" / "tasks"
    swapped.mkdir(parents=True)
    spec = (configs_dir() / "tasks" / "trec.yaml").read_text().replace("[ABBR, ENTY, DESC,", "[ABBR, DESC, ENTY,")
    (swapped / "trec.yaml").write_text(spec)
    monkeypatch.setenv("TELEPATHY_CONFIG_DIR", str(tmp_path / "config"))
    assert load_spec("trec").prompt == text
    with pytest.raises(UserError, match=r"label 1 of the spec is 'DESC', which is the dataset's class 2"):
        load_task(DataConfig(task="trec"))


@pytest.mark.slow
@pytest.mark.skipif(__import__("os").environ.get("TELEPATHY_SLOW") != "1", reason="3 GB of weights: TELEPATHY_SLOW=1")
def test_a_full_size_model_under_its_real_id_trains_offline(launch, hub_cache, tmp_path):
    """Qwen2.5-1.5B at full size (random weights, the real Qwen tokenizer) saved under its real hub id into a
    hub-layout cache: the registry's own entry loads it by id, offline, and one step trains."""
    import dataclasses

    import hubcache

    from telepathy.loading import load_model, load_tokenizer
    from telepathy.registry import load_registry

    spec = load_registry().get("qwen1.5b")
    hf_home = hubcache.copy(hub_cache[0], tmp_path / "hf")
    work = tmp_path / "ckpt"
    random_twin = dataclasses.replace(spec, weights="random", tokenizer=load_registry().get("tiny-qwen").tokenizer)
    load_model(random_twin, device="cpu", attn_implementation="sdpa").save_pretrained(work)
    load_tokenizer(random_twin).save_pretrained(work)
    hubcache.write_repo(hf_home / "hub", "model", spec.hub_id, "main", {p.name: p for p in work.iterdir()})
    env = {**offline_env((hf_home, hub_cache[1])), "OMP_NUM_THREADS": "2"}
    assert launch("prefetch", "--pair", "qwen1.5b", "--task", "sst2", "--check", env=env).returncode == 0
    r = launch(
        "--pair",
        "qwen1.5b",
        "--task",
        "sst2",
        "--debug",
        "--steps",
        "1",
        "--micro-batch",
        "2",
        "--global-batch",
        "2",
        "--eval-samples",
        "2",
        "--max-new-tokens",
        "2",
        "--baselines",
        "",
        "--latency-samples",
        "0",
        "--max-length",
        "32",
        "--name",
        "q",
        env=env,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert RunDir(tmp_path / "runs" / "q").is_complete()
