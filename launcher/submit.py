"""SLURM submission through submitit: one plan -> one job; several (a sweep) -> ONE array job.

The sbatch text comes from submitit's own renderer, both for `--dry-run` (`render_sbatch`) and for
submission (`submit_slurm`), from the same parameters (`slurm_parameters`), so the two cannot drift.
Per job: one task per node (`--ntasks-per-node=1`, `--gpus-per-node=G`), `srun --kill-on-bad-exit=1`,
`--signal=USR2@<signal_delay_s>`, `--requeue`, one log per node (stdout and stderr together). Each task
runs `launcher.node.NodeEntry` (torchrun for its node, then the preemption protocol) from a SNAPSHOT of
launcher/, telepathy/ and configs/ copied into ROOT/code/<n> at submit time: the script cd's there and
puts it first on PYTHONPATH, so editing the checkout afterwards changes nothing.

User strings reach the script only as arguments of shlex.quote (submitit quotes #SBATCH values and the
srun line itself). Secrets never enter it: a cluster profile may hold no secret-named variable and no
literal secret assignment in its setup, sbatch or srun lines (ClusterProfile, by telepathy/secrets.py);
secrets reach the job through the environment sbatch exports from the submitting shell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
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
from launcher.profiles import TORCHRUN_ENV, apply_overrides, sbatch_option
from telepathy.errors import UserError
from telepathy.files import atomic_write_bytes
from telepathy.hub import hub_env
from telepathy.paths import REPO_ROOT, configs_dir, user_config_dir
from telepathy.rundir import RunDir

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
    sender_cache_jobs: list[str] = field(default_factory=list)  # builds the tasks wait for (afterok)

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
            if self.sender_cache_jobs:
                lines.append(f"  after sender-cache build job(s) {', '.join(self.sender_cache_jobs)} (afterok)")
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
    prof, gpus = plan.profile, plan.layout.gpus_per_node
    env = {
        "PYTHONUNBUFFERED": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "OMP_NUM_THREADS": str(max(1, prof.cpus_for(gpus) // gpus)),  # the node's CPUs shared by its workers
        "TELEPATHY_CONFIGS": str(code_dir / "configs"),
        "TELEPATHY_CONFIG_DIR": str(code_dir / USER_CONFIGS),
        **TORCHRUN_ENV,
        **hub_env(prof),
    }
    for key, value in prof.env.items():  # secret names: refused by the profile itself (ClusterProfile)
        if not _ENV_NAME.match(str(key)):
            raise UserError(f"cluster profile '{prof.name}': env name {key!r} is not a valid variable name")
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


def _mounts(root: Path, code_dir: Path, prof) -> str:
    """What a container must see: the code snapshot and run folders (under root), the HF cache, the profile's."""
    paths = [str(root), *([prof.hf_home] if prof.hf_home else []), *prof.container_mounts]
    if not str(code_dir).startswith(str(root) + "/"):
        paths.insert(1, str(code_dir))
    return ",".join(dict.fromkeys(paths))


def slurm_parameters(plans: Sequence[Plan], *, name: str, code_dir: Path, root: Path | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for these plans (all tasks of a job share its resources), plus
    "python": the command that runs Python in the job step (inside the container, if the profile has one)."""
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
    check_profile_safe(prof)
    _check_script_safe("code folder", str(code_dir))
    for q in plans:
        _check_script_safe("run folder", q.run.run_dir)
    root = root or code_dir.parents[1]
    code, gpus = shlex.quote(str(code_dir)), lay.gpus_per_node
    cpus, mem = prof.cpus_for(gpus), prof.mem_gb_for(gpus)
    # Site setup (module load, conda activate) first: the exports then win over what it sets.
    setup = [*_header(plans), *prof.setup]
    setup += [f"export {k}={shlex.quote(v)}" for k, v in job_env(p, code_dir).items()]
    setup += [f"export PYTHONPATH={code}${{PYTHONPATH:+:$PYTHONPATH}}", f"cd {code}"]
    from submitit.slurm.slurm import _convert_mem  # noqa: PLC0415 (submitit's own GB -> sbatch unit)

    # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): without it the node's one task, and
    # so torchrun and every worker, is bound to a single CPU wherever the site binds tasks to cores.
    srun = ["--kill-on-bad-exit=1", f"--cpus-per-task={cpus}", *prof.srun_args]
    python = None
    if prof.container_image and prof.container_runtime == "pyxis":
        mounts = _mounts(root, code_dir, prof)
        srun += [f"--container-image={prof.container_image}", f"--container-mounts={mounts}"]
        srun += [f"--container-workdir={code_dir}"]
        python = "python3"  # the image's, which must hold telepathy's dependencies (not this machine's venv)
    elif prof.container_image:  # apptainer: the step runs python inside the image
        nv = ["--nv"] if prof.device == "cuda" else []
        python = shlex.join(["apptainer", "exec", *nv, "--bind", _mounts(root, code_dir, prof)])
        python += f" {shlex.quote(prof.container_image)} python3"
    extra: dict[str, Any] = {"requeue": True}
    if prof.reservation:
        extra["reservation"] = prof.reservation
    extra.update(sbatch_option(a) for a in prof.sbatch_args)
    params: dict[str, Any] = {
        "job_name": re.sub(r"[^A-Za-z0-9._+=-]", "_", name)[:128] or "telepathy",
        "time": prof.time_limit_min,
        "nodes": lay.nodes,
        "ntasks_per_node": 1,
        "gpus_per_node": prof.gpus_request(gpus),
        "cpus_per_task": cpus,
        "mem": "0" if mem is None else _convert_mem(mem),  # 0: all of the node's memory
        "signal_delay_s": prof.signal_delay_s,
        "array_parallelism": prof.array_parallelism,
        "setup": setup,
        "srun_args": srun,
        "stderr_to_stdout": True,
        "wckey": None,  # submitit's default wckey "submitit" fails where wckeys are enforced
        "additional_parameters": extra,
        "python": python,
    }
    if prof.exclusive_for(gpus):
        params["exclusive"] = True
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(prof, key):
            params[key] = getattr(prof, key)
    return params


def _shape(n: slurm.Node) -> str:
    gpus = ", ".join(f"{c} x gpu{':' + t if t else ''}" for t, c in sorted(n.gpus.items())) or "no GPUs"
    feats = f", features {'&'.join(sorted(n.features))}" if n.features else ""
    return f"{gpus}, {n.cpus} CPUs, {n.mem_mb / 1024:.0f} GB{feats}"


def check_fits(plan: Plan, nodes: list[slurm.Node] | None = None) -> None:
    """A request no node of the partition can satisfy is a one-line error before submitting (sbatch would
    accept it and the job would pend for ever). `nodes`: the cluster's, as sinfo reports them (asked here
    when None; nothing is checked where SLURM does not answer)."""
    prof, lay = plan.profile, plan.layout
    every = slurm.sinfo_nodes() if nodes is None else nodes
    if every is None:
        return
    nodes = [n for n in every if (n.partition == prof.partition if prof.partition else n.default)]
    where = f"partition {prof.partition}" if prof.partition else "the default partition"
    if not nodes:
        known = ", ".join(sorted({n.partition for n in every})) or "none"
        raise UserError(f"{where} does not exist or has no nodes (partitions: {known}); check --partition")
    g = lay.gpus_per_node
    cpus, mem = prof.cpus_for(g), prof.mem_gb_for(g)
    simple = prof.constraint and re.fullmatch(r"[\w.-]+(&[\w.-]+)*", prof.constraint)
    wanted = set(prof.constraint.split("&")) if simple else set()
    checks = {
        "GPUs": lambda n: n.gpu_count(prof.gpu_type) >= g,
        "features": lambda n: wanted <= n.features,
        "CPUs": lambda n: n.cpus >= cpus,
        "memory": lambda n: mem is None or n.mem_mb >= mem * 1024,  # SLURM's G is 1024 MB
    }
    fitting = [n for n in nodes if all(c(n) for c in checks.values())]
    if len(fitting) >= lay.nodes:
        return
    short = next((k for k, c in checks.items() if not any(c(n) for n in nodes)), "nodes")
    gpu = f"{g} x gpu:{prof.gpu_type}" if prof.gpu_type else f"{g} GPU(s)"
    ask = f"{gpu}, {cpus} CPUs, {'all memory' if mem is None else f'{mem:g} GB'}"
    if wanted:
        ask += f", features {prof.constraint}"
    shapes = sorted({_shape(n) for n in nodes})
    fix = {
        "GPUs": "set gpus_per_node (and gpu_type) in your cluster profile to what the nodes have",
        "features": "drop or change --constraint",
        "CPUs": "set cpus_per_node (or cpus_per_gpu) in your cluster profile to what the nodes have",
        "memory": "set mem_per_node_gb (or mem_per_gpu_gb) in your cluster profile to what the nodes have",
        "nodes": f"ask at most {len(fitting)} node(s) (fewer --gpus)",
    }[short]
    none = "no node" if lay.nodes == 1 else f"no {lay.nodes} nodes"
    raise UserError(
        f"{none} of {where} can run this job ({ask} per node; {len(fitting)} fit; the nodes "
        f"have {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}): {fix}"
    )


def check_profile_safe(prof) -> None:
    """Every profile value that reaches the script: no newline, '%' or backslash (see _UNSAFE_IN_SCRIPT)."""
    for key in ("partition", "account", "qos", "gpu_type", "constraint", "reservation", "exclude", "hf_home"):
        if getattr(prof, key):
            _check_script_safe(key, str(getattr(prof, key)))
    for key in ("sbatch_args", "srun_args", "container_mounts"):
        for value in getattr(prof, key):
            _check_script_safe(key, value)
    if prof.container_image:
        _check_script_safe("container_image", prof.container_image)


def _executor(root: Path, params: dict[str, Any]) -> _Executor:
    params = dict(params)
    ex = _Executor(folder=RunDir(root).slurm, python=params.pop("python", None))
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
    """Submit one run (one job) or a sweep (array jobs of at most MaxArraySize tasks). Completed tasks and
    tasks still queued or running are skipped, so submitting the same sweep again only submits what is left.
    The plans of the tasks submitted are (re)written first, so the job reads exactly what was asked now."""
    plans = list(plans)
    root, kind = _root_and_kind(plans, sweep_dir)
    check_fits(plans[0])
    record = JobRecord.for_plans(plans, root, kind)
    todo, complete, active = record.triage()
    result = SubmitResult(str(root), kind, [], [], complete, active)
    if not todo:
        return result
    code_dir = record.dir.next_code_snapshot()
    params = slurm_parameters([plans[i] for i in todo], name=_job_name(record, plans), code_dir=code_dir, root=root)
    fresh = not root.exists()
    try:
        result.job_ids = _submit(
            record,
            {i: plans[i] for i in todo},
            params,
            code_dir,
            snapshot=True,
            caches=_cache_builds(record, plans, todo),
        )
    except UserError:
        if fresh and not RunDir(root).jobs.exists():  # refused outright: leave no folder behind
            shutil.rmtree(root, ignore_errors=True)
        raise
    result.submitted, result.code_dir = todo, str(code_dir)
    result.sender_cache_jobs = [a["job_id"] for a in (record.submissions[-1].get("after") or [])]
    return result


def resubmit(
    record: JobRecord, indices: list[int] | None = None, overrides: dict[str, str] | None = None
) -> SubmitResult:
    """Submit again the tasks that are neither complete nor queued/running (failed, cancelled, out of
    requeues), on the code snapshot of their last submission: they resume from their checkpoints. `overrides`
    (profile fields, as `launch` takes them: partition, time_limit_min, account, max_requeues, ...) change
    their plans, which are rewritten before sbatch and recorded with the submission."""
    todo, complete, active = record.triage(indices)
    result = SubmitResult(record.root, record.kind, [], [], complete, active)
    if not todo:
        return result
    plans = {i: Plan.load(record.tasks[i].dir.plan) for i in todo}
    if overrides:
        plans = {i: dataclasses.replace(p, profile=apply_overrides(p.profile, overrides)) for i, p in plans.items()}
    check_fits(plans[todo[0]])
    code_dir = Path(record.last_submission(todo[0])["code_dir"])
    params = slurm_parameters(list(plans.values()), name=_job_name(record, list(plans.values())), code_dir=code_dir)
    result.job_ids = _submit(record, plans, params, code_dir, snapshot=False, overrides=overrides)
    result.submitted, result.code_dir = todo, str(code_dir)
    return result


def _cache_builds(record: JobRecord, plans: Sequence[Plan], todo: list[int]) -> list[Plan]:
    """One single-node plan per sender-cache entry that several tasks of this submission read: its own job
    builds it (over that node's GPUs) and the tasks wait for it (afterok), instead of all but one of them
    holding their GPUs while waiting on the builder's lock."""
    groups: dict[tuple, list[int]] = {}
    for i in todo:
        if (g := plans[i].cache_group) is not None:
            groups.setdefault(g, []).append(i)
    builds = []
    for n, members in enumerate(m for m in groups.values() if len(m) > 1):
        first = plans[members[0]]
        folder = record.dir.sender_cache_job(n)
        run = first.run.replace(run_dir=str(folder.path), name=f"{first.run.name}.sender-cache")
        builds.append(dataclasses.replace(first, run=run, layout=dataclasses.replace(first.layout, nodes=1)))
    return builds


@contextlib.contextmanager
def _written(plans: Sequence[Plan]):
    """Each plan's config.json and plan.json written (atomically) for the duration; restored to what they
    were (or removed) if the block fails, so a refused submission leaves no stale or half-new run folder."""
    saved: list[tuple[Path, bytes | None]] = []
    try:
        for plan in plans:
            for path in (plan.run.dir.config, plan.run.dir.plan):
                saved.append((path, path.read_bytes() if path.exists() else None))
            plan.write()
        yield
    except BaseException:
        for path, data in reversed(saved):
            if data is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(path, data)
        raise


def _submit(
    record: JobRecord,
    plans: dict[int, Plan],
    params: dict[str, Any],
    code_dir: Path,
    *,
    snapshot: bool,
    overrides: dict[str, str] | None = None,
    caches: Sequence[Plan] = (),
) -> list[str]:
    """Submit the tasks `plans` names (one job, or array jobs of at most MaxArraySize), after the sender-cache
    builds `caches` (their own jobs, which the tasks wait for), and record the job ids. Returns the SLURM job
    id of each job or array. Nothing stays written if sbatch refuses."""
    from launcher.node import NodeEntry  # noqa: PLC0415  (pickled by reference from the snapshot)

    if not slurm.slurm_available():
        raise UserError(
            "SLURM is not reachable from here (sbatch/srun/scontrol missing or the controller is "
            "down); start the test cluster with slurm/up.sh or submit from a login node"
        )
    todo = list(plans)
    entries = [NodeEntry(str(plans[i].run.dir.plan)) for i in todo]
    parts = chunks(len(todo), _max_array(plans[todo[0]]))
    # Chunks run side by side, each throttled to its share of the parallelism: none waits for another's
    # stragglers, and together they never exceed it.
    share = max(1, params["array_parallelism"] // len(parts))
    ex = _executor(Path(record.root), {**params, "array_parallelism": share})
    job_ids: list[str] = []
    with _written([*plans.values(), *caches]):
        if snapshot:
            snapshot_code(code_dir)
        try:
            after = []
            for build in caches:
                cex = _executor(Path(record.root), slurm_parameters([build], name=build.run.name, code_dir=code_dir))
                with contextlib.redirect_stderr(io.StringIO()):
                    job = cex.submit(NodeEntry(str(build.run.dir.plan), cache_only=True))
                after.append({"job_id": job.job_id, "sender_cache": build.run.run_dir})
            if after:
                ex.update_parameters(dependency="afterok:" + ":".join(a["job_id"] for a in after))
            for part in parts:
                # submitit prints sbatch's stderr before raising; the one-line error below says it instead
                with contextlib.redirect_stderr(io.StringIO()), ex.batch():
                    jobs = [ex.submit(entries[k]) for k in part]
                job_ids.append(
                    record.record_submission(
                        {todo[k]: job.job_id for k, job in zip(part, jobs)},
                        code_dir=code_dir,
                        script=str(jobs[0].paths.submission_file),
                        overrides=overrides,
                        after=after,
                    )
                )
        except Exception as e:  # noqa: BLE001  submitit raises FailedSubmissionError/CalledProcessError with sbatch's message
            if after and not job_ids:  # the cache builds would run for nothing
                slurm.scancel([a["job_id"] for a in after])
            if job_ids:  # an earlier chunk is queued: keep its files, say what did not go
                raise UserError(
                    f"sbatch refused part of the sweep after job(s) {', '.join(job_ids)}: {sbatch_error(e)}; "
                    "`launch resubmit` submits the rest"
                ) from None
            if snapshot:
                shutil.rmtree(code_dir, ignore_errors=True)
            raise UserError(f"sbatch refused the job: {sbatch_error(e)}") from None
    return job_ids


def sbatch_error(e: BaseException) -> str:
    """sbatch's own reason from a failed submission, as one line."""
    text = str(getattr(e, "stderr", "") or e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    line = (errors or lines or ["unknown error"])[-1]
    return re.sub(r"^(sbatch: )?error: (Batch job submission failed: )?", "", line)
