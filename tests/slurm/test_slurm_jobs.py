"""Real jobs on the real local cluster (slurm/up.sh): tiny-llama -> tiny-qwen trained through torchrun
with gloo on 1 node, 2 x 1 and 2 x 2; a 3-task array sweep; preemption by SIGUSR2 with requeue, resume
and resubmission to the same weights as an uninterrupted run; hostile strings; the code snapshot;
`launch status | logs | cancel | resubmit`. The independent jobs are submitted together at the start
(module fixture `started`) so they overlap; each test then checks its own."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cluster import REPO, last_step, launch, launch_json, logs, status, tiny_plan, tiny_run, wait_done, wait_for

from launcher import jobs
from launcher.submit import check_fits, render_sbatch, submit_slurm
from launcher.sweep import expand_sweep
from telepathy.errors import UserError
from telepathy.rundir import RunDir

pytestmark = pytest.mark.slurm

STEPS = 60  # long enough to preempt twice mid-run on 2 busy cores
TOKEN = f"hf_never_in_files_{uuid.uuid4().hex}"
PWNED = f"telepathy-pwned-{uuid.uuid4().hex[:8]}"
# Every way out of a quote: if any of these ran, a file named PWNED* would appear.
HOSTILE = f"a b'c\"d $(touch {PWNED}1) `touch {PWNED}2`; touch {PWNED}3 && x"
HOSTILE_ENV = f"$(touch {PWNED}4) ' \" ; touch {PWNED}5 `touch {PWNED}6`\ntouch {PWNED}7\n"

TINY = ("--pair", "tiny-llama-tiny-qwen", "--task", "demo", "--steps", "2")
DRIVER = """
import json, sys
import launcher
from launcher.plan import Plan
from launcher.submit import render_sbatch, submit_slurm
plan = Plan.load(sys.argv[1])
open(sys.argv[2], "w").write(render_sbatch(plan))
result = submit_slurm([plan])
print(json.dumps({"imported_from": launcher.__file__, **result.to_dict()}))
"""


def _copy_checkout(dest: Path) -> Path:
    for part in ("launcher", "telepathy", "configs"):
        shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture(scope="module")
def started(slurm_cluster, tmp_path_factory, hub_cache):
    """Submit the independent jobs at once: the reference run (from a copy of the checkout, parked in the
    DOWN partition `hold` until its test edits that copy), the run to preempt, the hostile 2 x 1 run, the sweep."""
    base = tmp_path_factory.mktemp("jobs")
    out: dict = {"base": base}

    checkout = _copy_checkout(base / "checkout")
    ref = tiny_plan(tiny_run(base / "reference", steps=STEPS), partition="hold")
    ref.save(base / "reference-plan.json")
    drv = subprocess.run(
        [sys.executable, "-c", DRIVER, str(base / "reference-plan.json"), str(base / "rendered.sh")],
        cwd=checkout,
        env=dict(os.environ, PYTHONPATH=str(checkout)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert drv.returncode == 0, drv.stderr
    out["reference"] = {"plan": ref, "checkout": checkout, "driver": json.loads(drv.stdout.splitlines()[-1])}

    preempt = tiny_plan(tiny_run(base / "preempted", steps=STEPS), max_requeues=1)
    # The preemption scenario must watch its job from the start: it runs in a thread beside the other tests.
    pool = ThreadPoolExecutor(1)
    out["preempted"] = pool.submit(_preemption_scenario, submit_slurm([preempt]))

    probe = base / "probe"
    probe.mkdir()
    hostile = tiny_plan(tiny_run(base / HOSTILE / "r2x1"), gpus=2, gpus_per_node=1)
    prof = dataclasses.replace(
        hostile.profile,
        env={**hostile.profile.env, "TELEPATHY_PROBE": HOSTILE_ENV},
        setup=(
            # setup runs before the job's exports: read the value when the script ends
            f"trap {shlex.quote('printenv TELEPATHY_PROBE > ' + shlex.quote(str(probe / 'value')))} EXIT",
            f'if [ -n "${{HF_TOKEN:-}}" ]; then touch {shlex.quote(str(probe / "token_seen"))}; fi',
        ),
    )
    hostile = dataclasses.replace(hostile, profile=prof)
    saved = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = TOKEN  # as a user's shell would have it: sbatch passes it on, nothing writes it
    try:
        out["hostile"] = {"plan": hostile, "result": submit_slurm([hostile]), "probe": probe}
    finally:
        if saved is None:
            del os.environ["HF_TOKEN"]
        else:
            os.environ["HF_TOKEN"] = saved

    # The first real run: models by hub id and a parquet task, from a hub-layout cache, on offline nodes.
    hf_home, config_dir = hub_cache
    offline = launch(
        "--pair",
        "rehearse-llama-rehearse-qwen",
        "--task",
        "sst2",
        "--cluster",
        "local",
        "--hf-home",
        str(hf_home),
        "--steps",
        "3",
        "--eval-samples",
        "4",
        "--baselines",
        "",
        "--latency-samples",
        "0",
        "--max-length",
        "48",
        "--name",
        "offline",
        "--runs-dir",
        str(base),
        "--slurm",
        env={"TELEPATHY_CONFIG_DIR": str(config_dir)},
    )
    assert offline.returncode == 0, offline.stderr
    out["offline"] = {"root": base / "offline", "hf_home": hf_home}

    sweep_dir = base / "sweep"
    cache_env = {"TELEPATHY_CACHE": str(base / "telepathy-cache")}  # this session's: nothing built earlier
    plans = [
        _with_env(
            tiny_plan(tiny_run(sweep_dir / name, name=f"sweep.{name}", sender_cache=True).replace(**o)), cache_env
        )
        for name, o in expand_sweep(["seed=1,2,3"])
    ]
    out["sweep"] = {"plans": plans, "dir": sweep_dir, "result": submit_slurm(plans, sweep_dir=sweep_dir)}
    yield out
    pool.shutdown(wait=False, cancel_futures=True)
    # leave the cluster clean whatever failed: cancel whatever of ours is still queued or running
    for record in base.rglob(RunDir(base).jobs.name):
        jobs.cancel(jobs.JobRecord.load(record.parent))


def _with_env(plan, env: dict):
    return dataclasses.replace(plan, profile=dataclasses.replace(plan.profile, env={**plan.profile.env, **env}))


def test_cli_sweep_is_one_array_per_max_array_size_and_cancels(slurm_cluster, tmp_path):
    """`launch --sweep` end to end through the CLI, parked in the DOWN partition: 3 tasks with
    --max-array-size 2 are two array jobs side by side; `launch cancel` cancels all; `launch resubmit`
    takes profile overrides (recorded, in the plan) and rolls back what it wrote when sbatch refuses."""
    out = launch(
        *TINY,
        "--sweep",
        "seed=1,2,3",
        "--cluster",
        "local",
        "--partition",
        "hold",
        "--max-array-size",
        "2",
        "--name",
        "swf",
        "--runs-dir",
        str(tmp_path),
        "--slurm",
    )
    assert out.returncode == 0, out.stderr
    root = tmp_path / "swf"
    record = jobs.JobRecord.load(root)
    first, second = [s["job_id"] for s in record.submissions]
    assert [t.job_id for t in record.tasks] == [f"{first}_0", f"{first}_1", second]  # a chunk of one is a plain job
    # The chunks run side by side (none waits for another's stragglers), each with its share of the throttle.
    assert "Dependency=(null)" in _scontrol_job(second) and "ArrayTaskThrottle=2" in _scontrol_job(first)
    array = subprocess.run(["squeue", "-h", "-r", "-j", first, "-o", "%i %P %T"], capture_output=True, text=True).stdout
    assert sorted(array.split("\n")[:2]) == [f"{first}_0 hold PENDING", f"{first}_1 hold PENDING"]
    rows = launch_json("status", str(root))["tasks"]
    assert [r["state"] for r in rows] == ["PENDING"] * 3 and [r["name"][:3] for r in rows] == ["000", "001", "002"]
    assert {r["reason"] for r in rows} == {"PartitionDown"}  # squeue's pending reason, shown by status
    cancelled = launch_json("cancel", str(root))["cancelled"]
    assert sorted(cancelled) == sorted(t.job_id for t in record.tasks)
    wait_for(lambda: [x["state"] for x in status(root)] == ["CANCELLED"] * 3, "the cancel", timeout=60)
    plan_file = RunDir(record.tasks[2].run_dir).plan
    before = plan_file.read_bytes()
    unknown = launch("resubmit", str(root), "--task", "2", "--partition", "nosuch")  # caught before sbatch
    assert unknown.returncode == 2 and "partition nosuch does not exist" in unknown.stderr, unknown.stderr
    refused = launch("resubmit", str(root), "--task", "2", "--exclude", "nosuchnode")  # what only sbatch knows
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "sbatch refused the job: invalid node name specified" in refused.stderr.lower(), refused.stderr
    assert plan_file.read_bytes() == before  # rolled back: the next resubmit does not inherit "nosuch"
    # cancelled tasks can be submitted again, with new profile settings that their plans then hold
    again = launch_json("resubmit", str(root), "--task", "2", "--time-limit-min", "20", "--max-requeues", "0")
    assert again["submitted"] == [2] and again["code_dir"] == record.submissions[-1]["code_dir"]
    plan = json.loads(plan_file.read_text())["profile"]
    assert (plan["time_limit_min"], plan["max_requeues"], plan["partition"]) == (20, 0, "hold")
    assert jobs.JobRecord.load(root).submissions[-1]["overrides"] == {"time_limit_min": "20", "max_requeues": "0"}
    assert "TimeLimit=00:20:00" in _scontrol_job(jobs.JobRecord.load(root).tasks[2].job_id)
    assert launch_json("cancel", str(root), "--task", "2")["cancelled"] == [jobs.JobRecord.load(root).tasks[2].job_id]
    # a refused first submission leaves nothing behind, so the corrected command just works
    fresh = launch(
        *TINY, "--cluster", "local", "--partition", "nosuch", "--name", "f", "--runs-dir", str(tmp_path), "--slurm"
    )
    assert fresh.returncode == 2 and fresh.stderr.count("\n") == 1 and not (tmp_path / "f").exists(), fresh.stderr


def _scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def test_site_options_are_accepted_by_sbatch_and_a_missing_feature_is_caught_first(slurm_cluster, tmp_path):
    """The profile's site options in the rendered script, judged by the real sbatch (--test-only: nothing
    runs). A reservation is rendered like them (tests/test_submit.py) but not exercised: this SLURM answers
    --test-only with "Invalid time specified" for any reservation not yet started, and one started now
    would take a node from the other tests."""
    site = {"constraint": "h100&ib", "exclude": "n2", "sbatch_args": "--comment=site", "srun_args": "--mpi=none"}
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(tiny_plan(tiny_run(tmp_path / "r"), gpus=2, **site)))
    test = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
    assert test.returncode == 0 and "to start at" in test.stderr and "on nodes n1" in test.stderr, test.stderr
    script.write_text(render_sbatch(tiny_plan(tiny_run(tmp_path / "r"), gpus=2, constraint="nvlink")))
    assert subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True).returncode != 0
    with pytest.raises(UserError, match="drop or change --constraint"):
        check_fits(tiny_plan(tiny_run(tmp_path / "r"), gpus=2, constraint="nvlink"))


def test_one_node_job_runs_its_snapshot_and_the_submitted_bytes_are_the_dry_run(started):
    ref = started["reference"]
    checkout, driver = ref["checkout"], ref["driver"]
    assert driver["imported_from"].startswith(str(checkout))  # submitted by the copy, not the repo
    root = Path(driver["root"])
    job_id = driver["job_ids"][0]
    # The job is parked; break the checkout it was submitted from, then let it run.
    for f in ("telepathy/train.py", "launcher/node.py", "launcher/plan.py"):
        (checkout / f).write_text('raise SystemExit("the edited checkout ran, not the snapshot")\n')
    (checkout / "configs" / "tasks" / "demo.yaml").write_text("not: [valid\n")
    subprocess.run(["scontrol", "update", f"job={job_id}", "partition=debug"], check=True)
    (row,) = wait_done(root)
    assert row["state"] == "COMPLETED", logs(root)
    assert (row["step"], row["steps"], row["attempts"]) == (STEPS, STEPS, 1)
    assert RunDir(root).is_complete() and (Path(driver["code_dir"]) / "code_version.json").is_file()
    assert f"code {driver['code_dir']}" in logs(root)
    submitted = root / "slurm" / f"{job_id}_submission.sh"
    assert submitted.read_bytes() == (started["base"] / "rendered.sh").read_bytes()  # dry-run == submission

    cli = launch_json("status", str(root))
    assert cli["schema"] == 1 and cli["kind"] == "run"
    (task,) = cli["tasks"]
    assert {k: task[k] for k in ("state", "step", "steps", "nodes", "complete")} == {
        "state": "COMPLETED",
        "step": STEPS,
        "steps": STEPS,
        "nodes": task["nodes"],
        "complete": True,
    }
    assert task["nodes"] in ("n1", "n2")  # whichever node the scheduler picked
    assert task["loss"] == jobs.last_train_record(RunDir(root))["loss"] and task["elapsed_s"] > 0
    text = launch("logs", str(root))
    assert text.returncode == 0 and "torchrun finished" in text.stdout and f"step {STEPS}/{STEPS}" in text.stdout
    followed = launch("logs", str(root), "--follow", timeout=60)  # ends by itself: the job is over
    assert followed.returncode == 0 and followed.stdout == text.stdout and "COMPLETED" in followed.stderr
    table = launch("status", str(root))
    assert "COMPLETED" in table.stdout and f"{STEPS}/{STEPS}" in table.stdout


def _preemption_scenario(result) -> dict:
    """Drive the job while it runs: USR2 mid-training -> checkpoint -> requeue -> resume; USR2 again with
    max_requeues=1 spent -> the job stops; `launch resubmit` -> it completes. Returns what was seen."""
    root, job_id = Path(result.root), result.job_ids[0]
    seen: dict = {"root": root}
    wait_for(lambda: last_step(root) >= 2, "training to start", timeout=300)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(lambda: "requeueing (1/1)" in logs(root), "the requeue", timeout=120)
    first_stop = RunDir(root).preempted_step()
    wait_for(lambda: "attempt 2 on" in logs(root), "the second attempt", timeout=120)
    wait_for(
        lambda: "resumed from" in logs(root) and last_step(root) >= first_stop + 2, "resumed training", timeout=240
    )
    seen["step_at_second_signal"] = last_step(root)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    (seen["stopped"],) = wait_done(root, timeout=180)
    seen["first_stop"], seen["stopped_logs"] = first_stop, logs(root)
    seen["resubmit"] = launch_json("resubmit", str(root))
    (seen["final"],) = wait_done(root)
    seen["final_logs"] = logs(root)
    return seen


def test_preempted_task_requeues_resumes_and_ends_with_the_uninterrupted_weights(started):
    from telepathy.checkpoint import latest_valid

    seen = started["preempted"].result(timeout=600)
    root, stopped, final = seen["root"], seen["stopped"], seen["final"]
    assert seen["step_at_second_signal"] < STEPS, "finished before the second signal: raise STEPS"
    assert (stopped["state"], stopped["exit_code"], stopped["attempts"]) == ("FAILED", "75:0", 2), seen["stopped_logs"]
    assert "NOT requeued: already requeued 1 time(s)" in seen["stopped_logs"]
    stopped_at = stopped["checkpoint_on_preemption"]
    assert seen["first_stop"] < stopped_at < STEPS and not stopped["complete"]
    assert seen["resubmit"]["submitted"] == [0] and len(seen["resubmit"]["job_ids"]) == 1
    assert final["state"] == "COMPLETED" and final["submissions"] == 2 and final["complete"], seen["final_logs"]
    assert (
        seen["final_logs"].count("resumed from") == 2 and str(RunDir(root).step(stopped_at).path) in seen["final_logs"]
    )

    ref_root = Path(started["reference"]["driver"]["root"])
    wait_done(ref_root)
    straight, resumed = latest_valid(RunDir(ref_root)), latest_valid(RunDir(root))
    assert straight.step == resumed.step == STEPS
    a, b = straight.bridge(), resumed.bridge()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_two_nodes_by_one_process_rendezvous_over_c10d_with_hostile_strings_quoted(started):
    hostile = started["hostile"]
    root = Path(hostile["result"].root)
    (row,) = wait_done(root)
    assert row["state"] == "COMPLETED", logs(root)
    assert row["nodes"] == "n[1-2]" and row["step"] == 4
    node0, node1 = (RunDir(root).slurm / f"{row['job_id']}_{k}_log.out" for k in (0, 1))
    for log in (node0, node1):
        text = log.read_text()
        assert "--nnodes=2" in text and "--rdzv_backend=c10d" in text and "--rdzv_endpoint=n1:" in text
    assert "--node_rank=1" in node1.read_text()
    assert {p.name for p in RunDir(root).logs.glob("worker_rank*.log")} == {"worker_rank0.log", "worker_rank1.log"}
    # hostile strings: the value arrived verbatim, nothing ran
    assert (hostile["probe"] / "value").read_text() == HOSTILE_ENV + "\n"
    base = started["base"]
    found = list(base.rglob(f"{PWNED}*")) + [
        p for d in (Path.cwd(), REPO, Path("/tmp"), Path.home()) for p in d.glob(f"{PWNED}*")
    ]
    assert found == []
    # the token reached the job through the environment, and no file of the run holds it
    assert (hostile["probe"] / "token_seen").exists()
    leaks = [p for p in root.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    assert launch_json("status", str(root))["tasks"][0]["state"] == "COMPLETED"


def test_two_nodes_by_two_processes(started):
    """After the 2 x 1 job: 2 nodes x 2 processes = world size 4, ranks spread over both nodes, typed GRES
    (gpu:h100) asked, and with the cluster binding tasks to cores (TaskPlugin=task/affinity), every worker
    may use all of its task's CPUs (a plain srun binds the node's one task to a single CPU)."""
    wait_done(started["hostile"]["result"].root)
    plan = tiny_plan(tiny_run(started["base"] / "r2x2"), gpus=4, gpus_per_node=2)
    assert (plan.layout.nodes, plan.layout.gpus_per_node) == (2, 2)
    root = Path(submit_slurm([plan]).root)
    (row,) = wait_done(root)
    assert row["state"] == "COMPLETED" and row["nodes"] == "n[1-2]" and row["step"] == 4, logs(root)
    assert {p.name for p in RunDir(root).logs.glob("worker_rank*.log")} == {f"worker_rank{r}.log" for r in range(4)}
    cpus = plan.profile.cpus_for(2)
    assert (
        cpus == 2 and "--gpus-per-node=h100:2" in Path(jobs.JobRecord.load(root).submissions[-1]["script"]).read_text()
    )
    for r in range(4):
        allowed = re.search(r"cpus: (\d+) allowed", RunDir(root).worker_log(r).read_text())
        assert allowed and int(allowed.group(1)) == min(cpus, os.cpu_count()), RunDir(root).worker_log(r).read_text()
    for k in (0, 1):
        text = (root / "slurm" / f"{row['job_id']}_{k}_log.out").read_text()
        assert "--nproc_per_node=2" in text and "--rdzv_endpoint=n1:" in text
    assert launch_json("status", str(root))["tasks"][0]["nodes"] == "n[1-2]"


def test_three_task_sweep_is_one_array_job_and_skips_completed_tasks_when_submitted_again(started):
    """The three tasks read one sender cache: a job of its own builds it (split over its node's ranks) and
    the array waits for it (afterok), so no task holds GPUs while another builds."""
    sweep = started["sweep"]
    result, root = sweep["result"], sweep["dir"]
    assert result.kind == "sweep" and len(result.job_ids) == 1 and result.submitted == [0, 1, 2]
    array = result.job_ids[0]
    assert [t.job_id for t in jobs.JobRecord.load(root).tasks] == [f"{array}_{i}" for i in range(3)]
    (build,) = jobs.JobRecord.load(root).submissions[0]["after"]
    assert result.sender_cache_jobs == [build["job_id"]]
    rows = wait_done(root)
    assert [r["state"] for r in rows] == ["COMPLETED"] * 3, logs(root)
    built = RunDir(build["sender_cache"]).worker_log(0).read_text()
    assert "sender cache: built" in built and "on 1 rank(s)" in built
    for r in rows:
        assert "sender cache: reading" in RunDir(r["run_dir"]).worker_log(0).read_text()
    assert [r["step"] for r in rows] == [4, 4, 4]
    seeds = [json.loads(RunDir(r["run_dir"]).config.read_text())["train"]["seed"] for r in rows]
    assert seeds == [1, 2, 3] and len({r["loss"] for r in rows}) == 3  # three different runs
    again = submit_slurm(sweep["plans"], sweep_dir=root)
    assert again.submitted == [] and again.skipped_complete == [0, 1, 2] and again.job_ids == []
    cli = launch_json("status", str(root))
    assert cli["kind"] == "sweep" and [t["state"] for t in cli["tasks"]] == ["COMPLETED"] * 3
    one = launch_json("status", rows[1]["run_dir"])  # a task's own folder selects that task
    assert [t["index"] for t in one["tasks"]] == [1]
    assert "--task I" in launch("logs", str(root)).stderr  # a sweep's log needs a task
    assert f"{array}_2" in launch("logs", str(root), "--task", "2").stdout


def test_an_offline_job_reads_models_and_data_only_from_the_cache(started):
    """The profile says the nodes are offline: the job exports HF_HUB_OFFLINE and the profile's HF_HOME, and
    loads the models by hub id and the task from parquet in that cache (the machine has no Hub to reach)."""
    root, hf_home = started["offline"]["root"], started["offline"]["hf_home"]
    (row,) = wait_done(root)
    assert row["state"] == "COMPLETED" and row["step"] == 3, logs(root)
    run = RunDir(root)
    (script,) = run.slurm.glob("*_submission.sh")
    text = script.read_text()
    assert f"export HF_HOME={hf_home}" in text and "export HF_HUB_OFFLINE=1" in text
    assert "export HF_DATASETS_OFFLINE=1" in text and "/user-configs" in text
    ev = json.loads(run.eval.read_text())
    assert ev["task"] == "sst2" and ev["n"] == 4
    assert json.loads(run.config.read_text())["sender"] == "rehearse-llama"
