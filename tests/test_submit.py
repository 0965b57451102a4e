"""The sbatch script, rendered without SLURM (what --dry-run prints): resources, preemption, snapshot,
environment, quoting and refusals. Submission of the same bytes to a real cluster is in tests/slurm."""

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.plan import make_plan
from launcher.profiles import ClusterProfile, load_profile
from launcher.slurm import parse_sinfo
from launcher.submit import check_fits, job_env, render_sbatch
from telepathy.config import RunConfig
from telepathy.errors import UserError
from telepathy.registry import load_registry

REG = load_registry()
PAIR = REG.pair("tiny-llama-tiny-qwen")


def plan_at(run_dir, gpus=2, profile="local", **overrides):
    prof = load_profile(profile, {k: str(v) for k, v in overrides.items()}, environ={})
    cfg = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir=str(run_dir), name="r1")
    return make_plan(PAIR, cfg, gpus=gpus, profile=prof, mode="slurm")


def with_env(plan, **env):
    from dataclasses import replace

    return replace(plan, profile=replace(plan.profile, env={**plan.profile.env, **env}))


def sbatch_lines(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            out[key] = value
    return out


def test_one_task_per_node_with_all_its_gpus_and_preemption_settings(tmp_path):
    plan = plan_at(
        tmp_path / "r1",
        gpus=8,
        gpus_per_node=4,
        cpus_per_gpu=3,
        mem_per_gpu_gb=2,
        signal_delay_s=45,
        account="proj",
        qos="high",
        time_limit_min=90,
    )
    script = render_sbatch(plan)
    s = sbatch_lines(script)
    resources = (s["nodes"], s["ntasks-per-node"], s["gpus-per-node"], s["cpus-per-task"], s["mem"])
    assert resources == ("2", "1", "h100:4", "12", "8GB")
    assert (s["signal"], s["time"], s["account"], s["qos"]) == ("USR2@45", "90", "proj", "high")
    assert s["partition"] == "debug"
    assert "requeue" in s and "wckey" not in s and "error" not in s  # stderr goes to the one log per node
    assert s["output"] == f"{tmp_path}/r1/slurm/%j_0_log.out"
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "--unbuffered" in srun and "-m submitit.core._submit" in srun
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_the_job_runs_the_snapshot_with_the_job_environment(tmp_path):
    plan = plan_at(tmp_path / "r1", hf_home="/shared/hf cache")
    script = render_sbatch(plan)
    code = f"{tmp_path}/r1/code/1"
    assert f"cd {code}" in script and f"export PYTHONPATH={code}${{PYTHONPATH:+:$PYTHONPATH}}" in script
    assert script.index(f"cd {code}") < script.index("srun ")
    for line in (
        "export PYTHONUNBUFFERED=1",
        "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        "export HF_HOME='/shared/hf cache'",
        "export OMP_NUM_THREADS=1",
        f"export TELEPATHY_CONFIGS={code}/configs",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1",  # torchrun restarts get a fresh store (profiles.py)
    ):
        assert line in script
    assert "# batch: micro" in script  # the header says what the planner chose and why


def test_rendering_writes_nothing(tmp_path):
    render_sbatch(plan_at(tmp_path / "r1"))
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_renders_one_array_script(tmp_path):
    plans = [plan_at(tmp_path / "sw" / f"00{i}-seed={i}", array_parallelism=2) for i in range(3)]
    script = render_sbatch(plans, sweep_dir=tmp_path / "sw")
    s = sbatch_lines(script)
    assert s["array"] == "0-2%2" and s["job-name"] == "sw" and s["output"].endswith("/sw/slurm/%A_%a_0_log.out")
    assert "%A_%a_%t_log.out" in script


def test_hostile_strings_are_quoted(tmp_path):
    evil = tmp_path / "a b'c\"$(touch PWNED);`touch PWNED2`&&x"
    plan = with_env(plan_at(evil / "r1"), PROBE="$(touch PWNED3) ' \" ; `id` \n newline")
    script = render_sbatch(plan)
    cd = next(line for line in script.splitlines() if line.startswith("cd "))
    assert shlex.split(cd) == ["cd", f"{evil}/r1/code/1"]
    assert "export PROBE='$(touch PWNED3) '\"'\"' \" ; `id` \n newline'" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("bad", ["new\nline", "car\rreturn", "per%cent", "back\\slash"])
def test_paths_that_cannot_go_into_a_script_are_refused(tmp_path, bad):
    with pytest.raises(UserError, match="cannot go into an sbatch script"):
        render_sbatch(plan_at(tmp_path / bad / "r1"))


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "MY_PASSWORD"])
def test_secret_like_profile_variables_are_refused(tmp_path, name):
    with pytest.raises(UserError, match="looks like a secret"):
        render_sbatch(with_env(plan_at(tmp_path / "r1"), **{name: "x"}))


def test_bad_variable_names_are_refused(tmp_path):
    with pytest.raises(UserError, match="not a valid variable name"):
        render_sbatch(with_env(plan_at(tmp_path / "r1"), **{"A B;touch x": "1"}))


def test_tokens_in_the_environment_never_reach_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    assert "hf_secret_value_123" not in render_sbatch(plan_at(tmp_path / "r1"))


def test_profile_env_overrides_defaults():
    prof = ClusterProfile(name="p", gpus_per_node=8, gpu_memory_gb=80, env={"OMP_NUM_THREADS": "4"})
    plan = make_plan(
        PAIR, RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir="/r"), gpus=1, profile=prof, mode="slurm"
    )
    assert job_env(plan, __import__("pathlib").Path("/c"))["OMP_NUM_THREADS"] == "4"


def test_requests_follow_the_node_size():
    """The default profile's node (96 CPUs, 960 GB, 8 GPUs): part of a node asks its share; a whole node
    asks --exclusive and all of its memory (1,600 GB per node was asked before: 1 TB nodes never ran it)."""
    half = sbatch_lines(render_sbatch(plan_at("/r/a", gpus=4, profile="dgx-h100")))
    assert (half["cpus-per-task"], half["mem"], half["gpus-per-node"]) == (
        "48",
        "480GB",
        "4",
    ) and "exclusive" not in half
    whole = sbatch_lines(render_sbatch(plan_at("/r/b", gpus=16, profile="dgx-h100")))
    assert (whole["nodes"], whole["cpus-per-task"], whole["mem"], whole["exclusive"]) == ("2", "96", "0", "")
    shares = sbatch_lines(render_sbatch(plan_at("/r/c", gpus=8, profile="dgx-h100", cpus_per_gpu=10, exclusive="no")))
    assert (shares["cpus-per-task"], shares["mem"]) == ("80", "0") and "exclusive" not in shares


def test_site_options_reach_the_script_in_their_place(tmp_path):
    plan = plan_at(
        tmp_path / "r1",
        gpus=2,
        gpu_type="h100",
        constraint="h100&ib",
        reservation="resv 1",
        exclude="n2",
        sbatch_args="--comment='two words' --hold",
        srun_args="--mpi=none",
        container_image="/images/t.sif",
        container_runtime="apptainer",
        container_mounts="/scratch",
    )
    plan = dataclasses.replace(plan, profile=dataclasses.replace(plan.profile, setup=("module load cuda",)))
    script = render_sbatch(plan)
    s = sbatch_lines(script)
    assert (s["gpus-per-node"], s["constraint"], s["reservation"], s["exclude"]) == (
        "h100:2",
        "'h100&ib'",
        "'resv 1'",
        "n2",
    )
    assert s["comment"] == "'two words'" and "hold" in s
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))
    assert "--mpi=none" in srun and "--cpus-per-task=2" in srun
    at = srun.index("apptainer")  # apptainer runs the step's python inside the image, with the folders bound
    assert srun[at : at + 3] == ["apptainer", "exec", "--bind"] and srun[at + 4 : at + 7] == [
        "/images/t.sif",
        "python3",
        "-u",
    ]
    assert srun[at + 3] == f"{tmp_path}/r1,/scratch"
    lines = script.splitlines()  # the site's setup runs first; the job's own exports then win
    assert lines.index("module load cuda") < lines.index("export PYTHONUNBUFFERED=1")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize(
    "option,message",
    [
        ({"sbatch_args": "--time=5"}, "may not set --time"),
        ({"sbatch_args": "-C ib"}, "long form"),
        ({"constraint": "a\nb"}, "cannot go into an sbatch script"),
        ({"srun_args": "--export=%x"}, "cannot go into an sbatch script"),
        ({"container_runtime": "docker"}, "container_runtime must be one of"),
    ],
)
def test_bad_site_options_are_one_line_errors(tmp_path, option, message):
    with pytest.raises(UserError, match=message):
        render_sbatch(plan_at(tmp_path / "r1", **option))


def test_a_request_no_node_can_satisfy_is_refused_with_what_the_nodes_have():
    text = "g1|gpu*|112|1031000|gpu:h100:8(S:0-1)|h100,ib|idle\ng2|gpu*|112|1031000|gpu:h100:8(S:0-1)|h100,ib|mixed\n"
    nodes, problems = parse_sinfo(text + "garbage line\n")
    assert problems == ["garbage line"] and nodes[0].gpus == {"h100": 8} and nodes[1].state == "mixed"
    check_fits(plan_at("/r/a", gpus=16, profile="dgx-h100", gpu_type="h100", constraint="ib"), nodes)  # fits
    for overrides, why in [
        ({"cpus_per_node": 128}, "set cpus_per_node"),
        ({"mem_per_gpu_gb": 200}, "set mem_per_node_gb"),
        ({"gpu_type": "a100"}, "set gpus_per_node"),
        ({"constraint": "nvlink"}, "--constraint"),
    ]:
        with pytest.raises(UserError, match=why) as e:
            check_fits(plan_at("/r/a", gpus=8, profile="dgx-h100", **overrides), nodes)
        assert "\n" not in str(e.value) and "112 CPUs, 1007 GB" in str(e.value)
    with pytest.raises(UserError, match="ask at most 2 node"):
        check_fits(plan_at("/r/a", gpus=24, profile="dgx-h100"), nodes)


REFERENCE = Path(__file__).parent / "data" / "reference.sbatch"


def test_the_rendered_script_is_the_reference_byte_for_byte():
    """A checked-in sbatch script for one fixed 2-node plan: any change in what submitit renders (another
    submitit version, another parameter) shows here. Only this interpreter's path is machine-specific.
    To accept a deliberate change: TELEPATHY_UPDATE_REFERENCE=1 pytest tests/test_submit.py."""
    plan = plan_at(
        "/nonexistent/runs/reference",
        gpus=8,
        profile="dgx-h100",
        gpus_per_node=4,
        cpus_per_node=64,
        mem_per_node_gb=1000,
        account="proj",
        partition="gpu",
        time_limit_min=240,
        hf_home="/shared/hf",
        gpu_type="h100",
        constraint="h100&ib",
        reservation="maint-window",
        exclude="gpu[07-08]",
        sbatch_args="--comment=telepathy --mail-type=END",
        srun_args="--mpi=none",
        container_image="nvcr.io#nvidia/pytorch:25.01-py3",
        container_mounts="/scratch",
    )
    script = render_sbatch(plan).replace(sys.executable, "PYTHON")
    if os.environ.get("TELEPATHY_UPDATE_REFERENCE") == "1":
        REFERENCE.write_text(script)
    assert script == REFERENCE.read_text(), "the sbatch script changed; see this test's docstring"
