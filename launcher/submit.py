"""SLURM submission through submitit: one plan -> one job; several (a sweep) -> ONE array job.

The sbatch text comes from submitit's own renderer, both for `--dry-run` (`render_sbatch`) and for
submission (`submit_slurm`), from the same parameters (`slurm_parameters`), so the two cannot drift.
Per job: one task per node (`--ntasks-per-node=1`, `--gpus-per-node=G`), `srun --kill-on-bad-exit=1`,
`--signal=USR2@<signal_delay_s>`, `--requeue`, one log per node (stdout and stderr together). Each task
runs `launcher.node.NodeEntry` (torchrun for its node, then the preemption protocol) from a SNAPSHOT of
launcher/, telepathy/ and configs/ copied into ROOT/code/<n> at submit time: the script cd's there and
puts it first on PYTHONPATH, so editing the checkout afterwards changes nothing.

User strings reach the script only as arguments of shlex.quote (submitit quotes #SBATCH values and the
srun line itself). Secrets never enter it: the profile may not define token-like variables; they reach
the job through the environment sbatch exports from the submitting shell.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit import SlurmExecutor

from launcher import slurm
from launcher.jobs import JobRecord
from launcher.plan import Plan
from telepathy.errors import UserError
from telepathy.hub import hub_env
from telepathy.paths import REPO_ROOT, configs_dir, user_config_dir
from telepathy.rundir import RunDir
from telepathy.secrets import is_secret_name

CODE_PACKAGES = ("launcher", "telepathy")
USER_CONFIGS = "user-configs"  # the user's configuration folder, as it was at submission
# #SBATCH lines end at a newline, SLURM expands % in paths, and sbatch drops backslashes even in quotes
_UNSAFE_IN_SCRIPT = re.compile(r"[\x00-\x1f\x7f%\\]")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Executor(SlurmExecutor):
    """submitit's SLURM executor, also constructible where srun is absent, so a laptop can render the
    exact script for --dry-run (submission itself first checks `slurm_available`)."""

    @classmethod
    def affinity(cls) -> int:
        return 2


@dataclass
class SubmitResult:
    root: str
    kind: str  # "run" or "sweep"
    job_ids: list[str]  # one per array job (or the single job)
    submitted: list[int] = field(default_factory=list)  # task indices
    skipped_complete: list[int] = field(default_factory=list)
    skipped_active: list[int] = field(default_factory=list)
    code_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        if not self.submitted:
            lines = [f"nothing to submit in {self.root}"]
        else:
            jobs = ", ".join(self.job_ids)
            lines = [
                f"submitted {len(self.submitted)} task(s) as SLURM job {jobs}"
                if self.kind == "sweep"
                else f"submitted SLURM job {jobs}",
                f"  folder: {self.root}",
                f"  code snapshot: {self.code_dir}",
            ]
        if self.skipped_complete:
            lines.append(f"  skipped {len(self.skipped_complete)} completed task(s)")
        if self.skipped_active:
            lines.append(f"  skipped {len(self.skipped_active)} task(s) still queued or running")
        root, task = shlex.quote(self.root), " --task 0" if self.kind == "sweep" else ""
        lines.append(f"  follow: launch status {root}   |   launch logs {root}{task} --follow")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the script


def _check_script_safe(what: str, text: str) -> None:
    if _UNSAFE_IN_SCRIPT.search(text):
        raise UserError(
            f"{what} {text!r} contains a control character, '%' or a backslash, which cannot go into "
            "an sbatch script (SLURM expands % in paths and drops backslashes); choose another"
        )


def job_env(plan: Plan, code_dir: Path) -> dict[str, str]:
    """The variables the script exports (besides PYTHONPATH): the defaults, then the profile's `env`."""
    prof = plan.profile
    env = {
        "PYTHONUNBUFFERED": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "OMP_NUM_THREADS": str(prof.cpus_per_gpu),
        "TELEPATHY_CONFIGS": str(code_dir / "configs"),
        "TELEPATHY_CONFIG_DIR": str(code_dir / USER_CONFIGS),
        **hub_env(prof),
    }
    for key, value in prof.env.items():
        if not _ENV_NAME.match(str(key)):
            raise UserError(f"cluster profile '{prof.name}': env name {key!r} is not a valid variable name")
        if is_secret_name(str(key)):
            raise UserError(
                f"cluster profile '{prof.name}': {key} looks like a secret and would be written into "
                "the job script; remove it and export it in your shell (sbatch passes it to the job)"
            )
        env[str(key)] = str(value)
    return env


def _header(plans: Sequence[Plan]) -> list[str]:
    """Comment lines saying what the job runs and why its batch is what it is (values JSON-escaped)."""
    p = plans[0]
    b, lay = p.batch, p.layout
    lines = [
        f"# telepathy: {json.dumps(p.run.sender)} -> {json.dumps(p.run.receiver)}, {lay.nodes} node(s) x "
        f"{lay.gpus_per_node} GPU(s), backend {p.run.backend}, device {p.device}",
        f"# batch: micro {b.micro_batch} x accum {b.grad_accum} x {lay.world_size} = {b.global_batch} "
        f"(source: {b.source}); predicted peak {p.memory.get('total_gib', 0):.2f} GiB per GPU",
    ]
    if len(plans) > 1:
        lines.append(f"# {len(plans)} array tasks; each task's run configuration and plan are in its run folder")
    return lines


def slurm_parameters(plans: Sequence[Plan], *, name: str, code_dir: Path) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for these plans (all tasks of a job share its resources)."""
    p = plans[0]
    prof, lay = p.profile, p.layout
    for other in plans[1:]:
        if other.layout != lay or other.profile != prof:
            raise UserError(
                "all tasks of a sweep must use the same nodes, GPUs and cluster profile; "
                "split the sweep by --gpus or cluster"
            )
    if any(q.mode != "slurm" for q in plans):
        raise ValueError("submit_slurm takes plans made for mode 'slurm'")
    _check_script_safe("code folder", str(code_dir))
    for q in plans:
        _check_script_safe("run folder", q.run.run_dir)
    if prof.hf_home:
        _check_script_safe("hf_home", prof.hf_home)
    code = shlex.quote(str(code_dir))
    setup = _header(plans)
    setup += [f"export {k}={shlex.quote(v)}" for k, v in job_env(p, code_dir).items()]
    setup += [f"export PYTHONPATH={code}${{PYTHONPATH:+:$PYTHONPATH}}", *prof.setup, f"cd {code}"]
    from submitit.slurm.slurm import _convert_mem  # noqa: PLC0415 (submitit's own GB -> sbatch unit)

    params: dict[str, Any] = {
        "job_name": re.sub(r"[^A-Za-z0-9._+=-]", "_", name)[:128] or "telepathy",
        "time": prof.time_limit_min,
        "nodes": lay.nodes,
        "ntasks_per_node": 1,
        "gpus_per_node": lay.gpus_per_node,
        "cpus_per_task": prof.cpus_per_gpu * lay.gpus_per_node,
        "mem": _convert_mem(prof.mem_per_gpu_gb * lay.gpus_per_node),
        "signal_delay_s": prof.signal_delay_s,
        "array_parallelism": prof.array_parallelism,
        "setup": setup,
        "srun_args": ["--kill-on-bad-exit=1"],
        "stderr_to_stdout": True,
        "wckey": None,  # submitit's default wckey "submitit" fails where wckeys are enforced
        "additional_parameters": {"requeue": True},
    }
    for key in ("partition", "account", "qos"):
        if getattr(prof, key):
            params[key] = getattr(prof, key)
    return params


def _executor(root: Path, params: dict[str, Any]) -> _Executor:
    ex = _Executor(folder=RunDir(root).slurm)
    ex.update_parameters(**params)
    return ex


def _script(root: Path, params: dict[str, Any], n_tasks: int) -> str:
    """What submitit writes for a job of n_tasks (n > 1: an array), by its own code path."""
    ex = _executor(root, params)
    if n_tasks > 1:
        ex.parameters["map_count"] = n_tasks  # what SlurmExecutor does for an array
    return ex._make_submission_file_text(ex._submitit_command_str, "")


# ------------------------------------------------------------------------------------------ submitting


def chunks(n: int, max_array_size: int) -> list[range]:
    """Task indices per array job: SLURM array indices must stay below MaxArraySize."""
    if max_array_size < 1:
        raise ValueError(f"max_array_size must be >= 1 (got {max_array_size})")
    return [range(i, min(i + max_array_size, n)) for i in range(0, n, max_array_size)]


def _root_and_kind(plans: Sequence[Plan], sweep_dir: str | Path | None) -> tuple[Path, str]:
    if not plans:
        raise ValueError("no plans to submit")
    if sweep_dir is not None:
        return Path(sweep_dir).absolute(), "sweep"
    if len(plans) != 1:
        raise ValueError("several plans are a sweep: pass sweep_dir")
    return Path(plans[0].run.run_dir).absolute(), "run"


def _job_name(record: JobRecord, plans: Sequence[Plan]) -> str:
    return record.dir.path.name if record.kind == "sweep" else plans[0].run.name


def snapshot_code(dest: Path) -> Path:
    """Copy launcher/, telepathy/ and the configs in use into dest (atomically: a half copy never runs)."""
    from telepathy.manifest import record_code_version  # noqa: PLC0415  (git only when submitting)

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in CODE_PACKAGES:
        shutil.copytree(REPO_ROOT / pkg, tmp / pkg, ignore=ignore)
    shutil.copytree(configs_dir(), tmp / "configs", ignore=ignore)
    if user_config_dir().is_dir():
        shutil.copytree(user_config_dir(), tmp / USER_CONFIGS, ignore=ignore)
    else:
        (tmp / USER_CONFIGS).mkdir()
    record_code_version(REPO_ROOT, tmp)
    tmp.rename(dest)
    return dest


def _max_array(plan: Plan) -> int:
    ctl = slurm.controller_max_array_size()
    return min(plan.profile.max_array_size, ctl) if ctl else plan.profile.max_array_size


def render_sbatch(plans: Plan | Sequence[Plan], *, sweep_dir: str | Path | None = None) -> str:
    """The exact sbatch script submit_slurm would submit for these plans (a sweep: its first array job).
    Writes nothing."""
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    root, kind = _root_and_kind(plans, sweep_dir)
    n = len(plans)
    if RunDir(root).jobs.exists():  # submitting again: only what is left runs
        try:
            n = len(JobRecord.for_plans(plans, root, kind).triage()[0]) or n
        except UserError:
            pass  # no SLURM here to ask: show every task
    if kind == "sweep":
        n = min(n, _max_array(plans[0]))
    name = root.name if kind == "sweep" else plans[0].run.name
    return _script(root, slurm_parameters(plans, name=name, code_dir=RunDir(root).next_code_snapshot()), n)


def submit_slurm(plans: Sequence[Plan], *, sweep_dir: str | Path | None = None) -> SubmitResult:
    """Submit one run (one job) or a sweep (one array job, chunked over MaxArraySize; the chunks run one
    after another so the array parallelism holds overall). Completed tasks and tasks still queued or
    running are skipped, so submitting the same sweep again only submits what is left."""
    plans = list(plans)
    root, kind = _root_and_kind(plans, sweep_dir)
    record = JobRecord.for_plans(plans, root, kind)
    todo, complete, active = record.triage()
    result = SubmitResult(str(root), kind, [], [], complete, active)
    if not todo:
        return result
    for i in todo:
        if not plans[i].run.dir.plan.exists():
            plans[i].write()
    code_dir = record.dir.next_code_snapshot()
    params = slurm_parameters(plans, name=_job_name(record, plans), code_dir=code_dir)
    snapshot_code(code_dir)
    result.job_ids, result.submitted = _submit(record, todo, params, code_dir), todo
    result.code_dir = str(code_dir)
    return result


def resubmit(record: JobRecord, indices: list[int] | None = None) -> SubmitResult:
    """Submit again the tasks that are neither complete nor queued/running (failed, cancelled, out of
    requeues), on the code snapshot and plan of their last submission: they resume from their checkpoints."""
    todo, complete, active = record.triage(indices)
    result = SubmitResult(record.root, record.kind, [], [], complete, active)
    if not todo:
        return result
    plans = [Plan.load(record.tasks[i].dir.plan) for i in todo]
    code_dir = Path(record.last_submission(todo[0])["code_dir"])
    params = slurm_parameters(plans, name=_job_name(record, plans), code_dir=code_dir)
    result.job_ids, result.submitted, result.code_dir = _submit(record, todo, params, code_dir), todo, str(code_dir)
    return result


def _submit(record: JobRecord, todo: list[int], params: dict[str, Any], code_dir: Path) -> list[str]:
    """Submit the tasks `todo` of the record (one job, or array jobs of at most MaxArraySize) and record
    the job ids. Returns the SLURM job id of each job or array."""
    from launcher.node import NodeEntry  # noqa: PLC0415  (pickled by reference from the snapshot)

    if not slurm.slurm_available():
        raise UserError(
            "SLURM is not reachable from here (sbatch/srun/scontrol missing or the controller is "
            "down); start the test cluster with slurm/up.sh or submit from a login node"
        )
    root = Path(record.root)
    entries = [NodeEntry(str(record.tasks[i].dir.plan)) for i in todo]
    ex = _executor(root, params)
    max_array = _max_array(Plan.load(entries[0].plan_path))
    job_ids: list[str] = []
    for part in chunks(len(todo), max_array):
        if job_ids:  # chunks of one sweep run one after another: the %parallelism then holds overall
            ex.update_parameters(dependency=f"afterany:{job_ids[-1]}")
        try:
            with ex.batch():
                jobs = [ex.submit(entries[k]) for k in part]
        except Exception as e:  # noqa: BLE001  submitit raises FailedSubmissionError/CalledProcessError with sbatch's message
            raise UserError(f"sbatch refused the job: {str(e).strip().splitlines()[-1]}") from None
        job_ids.append(
            record.record_submission(
                {todo[k]: job.job_id for k, job in zip(part, jobs)},
                code_dir=code_dir,
                script=str(jobs[0].paths.submission_file),
            )
        )
    return job_ids
