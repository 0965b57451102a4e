"""What runs on each node of a SLURM job: torchrun for this node, then the preemption protocol.

submitit starts one task per node (`srun`, `--ntasks-per-node=1`) and calls `NodeEntry(plan_path)()`
in it, importing this module from the job's code snapshot. The entry

1. builds this node's torchrun command from the plan and the SLURM environment: `--standalone` on one
   node; otherwise c10d rendezvous on the job's first node, resolved here on the compute node, at a port
   the first node finds free and publishes in the run folder for this attempt (the others wait for it). An
   unresolvable (or wrongly loopback) first node is an error, never a silent fall-back to localhost;
2. starts torchrun with SIGUSR2 *ignored*: torchrun has no handler for it (the default action kills
   it), an ignored disposition survives exec, and the workers install their own handler;
3. on SIGUSR2 (SLURM's `--signal=USR2@T` before the time limit, or `scancel --signal=USR2`), which
   SLURM delivers to every process of the step, only notes it: the workers checkpoint at the next step
   boundary and exit; torchrun then exits 1. The checkpoint is durable once rank 0 has written
   the run folder's preemption marker. Each other node then records that its torchrun has exited and waits
   for the requeue to end it; the first task waits for those records (at most NODES_STOP_WAIT_S), so a
   node still shutting down is not killed mid-exit, and requeues the job (`scontrol requeue`), at most
   `profile.max_requeues` times (SLURM_RESTART_COUNT). A node whose workers exited with the preemption
   code counts as signalled even when its own SIGUSR2 has not arrived yet (SLURM signals nodes one by one).

SIGTERM (scancel, a SLURM-driven preemption, the hard time limit) never requeues from here: a user's
cancel must stay cancelled, and SLURM requeues PreemptMode=REQUEUE jobs itself.

What a cluster's preemption setting means for a run (the time-limit USR2 works everywhere):
- PreemptMode=REQUEUE: SLURM sends SIGTERM (USR2 only with SlurmctldParameters=preempt_send_user_signal),
  waits GraceTime, kills, and requeues the job itself. Workers checkpoint on SIGTERM too, and torchrun
  gives them 30 s before killing them: progress since the last periodic checkpoint survives when one
  step plus the checkpoint fit in min(GraceTime, 30 s).
- PreemptMode=CANCEL: the job is cancelled and does not come back; `launch resubmit` continues it from
  its newest checkpoint. PreemptMode=SUSPEND/GANG: no signal, nothing to do.
- `scontrol requeue` needs JobRequeue (default on; the job also asks for --requeue) and scontrol on
  the compute node; without them the job stops after its checkpoint and `launch resubmit` continues it.
Torch-free at import: the submitting CLI pickles a NodeEntry by reference.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from launcher.profiles import TORCHRUN_ENV
from telepathy.files import atomic_write_json, read_json
from telepathy.rundir import EXIT_PREEMPTED, RunDir
from telepathy.secrets import redact

RENDEZVOUS_WAIT_S = 300  # other nodes: how long to wait for the first node's rendezvous address
CHECKPOINT_WAIT_S = 120  # after torchrun exits on a signal: how long to wait for rank 0's preemption marker
REQUEUE_WAIT_S = 120  # other nodes: how long to wait for the first task's requeue to end them
NODES_STOP_WAIT_S = 60  # the first node: how long to wait for the others' torchrun to exit before requeueing


class RendezvousError(RuntimeError):
    """The first node cannot be reached as the rendezvous host from this node."""


@dataclass(frozen=True)
class SlurmTask:
    """This task's view of the job, from the variables SLURM sets in every task."""

    job_id: str  # SLURM_JOB_ID: unique per array task, and kept across requeues
    requeue_id: str  # what `scontrol requeue` takes: ARRAYJOB_TASK for an array task, else the job id
    procid: int  # one task per node, so this is also the node's rank
    nnodes: int
    nodelist: str
    restarts: int  # SLURM_RESTART_COUNT: requeues so far

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ = os.environ) -> SlurmTask:
        try:
            job_id = env["SLURM_JOB_ID"]
            array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
            return cls(
                job_id=job_id,
                requeue_id=f"{array_job}_{array_task}" if array_job else job_id,
                procid=int(env.get("SLURM_PROCID", 0)),
                nnodes=int(env.get("SLURM_JOB_NUM_NODES", 1)),
                nodelist=env.get("SLURM_JOB_NODELIST", ""),
                restarts=int(env.get("SLURM_RESTART_COUNT", 0)),
            )
        except KeyError:
            raise RuntimeError("the node entry runs inside a SLURM job (SLURM_JOB_ID is not set)") from None


def free_port() -> int:
    """A TCP port free on this node now (the kernel picks it, as torchrun's --standalone does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def publish_rendezvous(run_dir: RunDir, task: SlurmTask, host: str) -> str:
    """The first node: a port free on it, written to the run folder for this attempt. Unlike a port derived
    from the job id, two jobs (or two attempts) can never pick the same one while both are alive."""
    endpoint = f"{host}:{free_port()}"
    atomic_write_json(run_dir.rendezvous, {"job_id": task.job_id, "restarts": task.restarts, "endpoint": endpoint})
    return endpoint


def read_rendezvous(run_dir: RunDir, task: SlurmTask, timeout: float = RENDEZVOUS_WAIT_S) -> str:
    """The other nodes: the endpoint the first node published for this attempt (an older attempt's is ignored)."""

    def current() -> str | None:
        d = read_json(run_dir.rendezvous, "rendezvous")
        ok = d and d.get("job_id") == task.job_id and d.get("restarts") == task.restarts
        return d["endpoint"] if ok else None

    if not _wait_for(lambda: current() is not None, timeout):
        raise RendezvousError(
            f"the first node did not publish its rendezvous address in {run_dir.rendezvous} within {timeout:.0f} s "
            "(is the run folder on a file system every node shares?)"
        )
    return current()


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (n[1-2],gpu07) as names: scontrol is the reference; submitit's
    parser when scontrol is missing on compute nodes, as on some clusters."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    from submitit.slurm.slurm import _parse_node_list  # noqa: PLC0415

    return _parse_node_list(nodelist)


def _addresses(host: str) -> set[str]:
    return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}


def check_rendezvous_host(host: str) -> None:
    """Fail loudly unless `host` resolves here to an address SLURM also uses for it. A name that
    resolves to loopback while SLURM reaches the node elsewhere would make each node rendezvous with
    itself (the classic silent localhost fall-back)."""
    here = socket.gethostname()
    try:
        mine = _addresses(host)
    except OSError as e:
        raise RendezvousError(
            f"rendezvous host {host} (first node of the job) does not resolve on {here}: {e}; "
            "fix name resolution of the compute nodes"
        ) from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in mine):
        return
    try:
        line = subprocess.run(
            ["scontrol", "show", "node", host, "-o"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        node_addr = next(f.split("=", 1)[1] for f in line.split() if f.startswith("NodeAddr="))
        slurms = _addresses(node_addr)
    except (OSError, subprocess.SubprocessError, StopIteration) as e:
        raise RendezvousError(
            f"rendezvous host {host} resolves to loopback ({', '.join(sorted(mine))}) on {here} "
            f"and SLURM's address for it is unknown ({e}); refusing to rendezvous on "
            "localhost"
        ) from None
    if not mine & slurms:
        raise RendezvousError(
            f"rendezvous host {host} resolves to {', '.join(sorted(mine))} on {here}, but SLURM "
            f"reaches it at {node_addr} ({', '.join(sorted(slurms))}): fix /etc/hosts or DNS "
            "on the compute nodes"
        )


# ---------------------------------------------------------------------------------------------- failures


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def newest_checkpoint(run_dir: RunDir) -> int | None:
    """The step of the newest published checkpoint (its manifest, written last, exists); torch-free."""
    return next((s.step for s in run_dir.step_dirs() if s.manifest.is_file()), None)


def record_failure(run_dir: RunDir, task: SlurmTask, rc: int) -> dict:
    """Why this node's torchrun failed, as one line, from what torchrun reported (torchrun_main's record of
    its ChildFailedError), written to the run folder for `launch status`. A worker killed by a signal, or
    torchrun itself killed, is a cause; a worker exiting 1 because a peer vanished is usually an effect."""
    from launcher.jobs import last_train_record  # noqa: PLC0415  (torch-free; only on failure)

    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # SLURM's name for the node
    where = f"node {task.procid} ({host})"
    workers = read_json(run_dir.worker_failures(task.procid), "torchrun failures") or {}
    failed = workers.get("failures") or []
    if rc < 0:
        cause, signalled = f"torchrun on {where} was killed by {_signal_name(rc)}", True
    elif failed:
        # the first signal death, else the first failure torchrun observed
        first = min(failed, key=lambda f: (f["exitcode"] >= 0, f["timestamp"]))
        how = (
            f"was killed by {_signal_name(first['exitcode'])}"
            if first["exitcode"] < 0
            else f"exited with code {first['exitcode']}"
        )
        cause = f"rank {first['rank']} (on {where}, local rank {first['local_rank']}) {how}"
        signalled = first["exitcode"] < 0
    else:
        cause, signalled = f"torchrun on {where} exited with code {rc}", False
    last = (last_train_record(run_dir) or {}).get("step")
    ckpt = newest_checkpoint(run_dir)
    reason = (
        f"{cause}{'' if last is None else f' after step {last}'}; "
        f"{'no checkpoint yet' if ckpt is None else f'the newest checkpoint is step {ckpt}'}. "
        f"Continue with `launch resubmit {shlex.quote(str(run_dir))}` (worker logs: {run_dir.logs})"
    )
    record = {
        "job_id": task.requeue_id,  # as the job record names it (ARRAYJOB_TASK for an array task)
        "restarts": task.restarts,
        "node": task.procid,
        "host": host,
        "reason": reason,
        "cause": 0 if rc < 0 else (1 if signalled else 2),  # 0 torchrun killed, 1 a worker killed, 2 an exit
        "at": time.time(),
    }
    atomic_write_json(run_dir.node_failure(task.procid), record)
    return record


def workers_preempted(run_dir: RunDir, node: int) -> bool:
    """Whether this node's workers stopped for a preemption: one exited with the preemption code and each
    other did too, or was ended by the SIGTERM torchrun sends the rest of a group once one worker exits."""
    failed = (read_json(run_dir.worker_failures(node), "torchrun failures") or {}).get("failures") or []
    codes = {f["exitcode"] for f in failed}
    return EXIT_PREEMPTED in codes and codes <= {EXIT_PREEMPTED, -signal.SIGTERM}


def torchrun_main(failures_path: str, argv: list[str]) -> None:
    """torchrun (torch.distributed.run) in this process; when workers fail, what torchrun knows of each
    (global rank, local rank, exit code or signal, time) is written to failures_path before it exits."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: PLC0415
    from torch.distributed.run import main  # noqa: PLC0415

    try:
        main(argv)
    except ChildFailedError as e:
        failures = [
            {"rank": rank, "local_rank": f.local_rank, "exitcode": f.exitcode, "pid": f.pid, "timestamp": f.timestamp}
            for rank, f in e.failures.items()
        ]
        atomic_write_json(Path(failures_path), {"failures": failures})
        raise


class _Signals:
    """SIGUSR2 and SIGTERM only set flags here; what to do is decided once torchrun has exited.
    Installed over submitit's handlers (which would requeue immediately, before any checkpoint)."""

    def __init__(self) -> None:
        self.usr2 = False
        self.term = False
        signal.signal(signal.SIGUSR2, self._on_usr2)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_usr2(self, signum: int, frame: FrameType | None) -> None:
        self.usr2 = True

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.term = True


def _ignore_usr2() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def start_torchrun(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """torchrun (or any launcher) with SIGUSR2 ignored; workers that handle it still get it."""
    return subprocess.Popen(argv, preexec_fn=_ignore_usr2, **popen_kwargs)


def _log(task: SlurmTask, message: str) -> None:
    print(f"[telepathy node {task.procid}/{task.nnodes} job {task.requeue_id}] {redact(message)}", flush=True)


def _wait_for(predicate, timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


class NodeEntry:
    """The callable submitit runs in each task (one per node). Holds only the plan's path: everything
    else is read on the node, from the run folder and the code snapshot."""

    def __init__(self, plan_path: str, *, cache_only: bool = False) -> None:
        self.plan_path, self.cache_only = plan_path, cache_only

    def __repr__(self) -> str:
        return f"NodeEntry({self.plan_path!r}{', cache_only=True' if self.cache_only else ''})"

    def torchrun_argv(self, plan, task: SlurmTask) -> list[str]:
        from launcher.plan import torchrun_command  # noqa: PLC0415  (from the snapshot, like everything here)

        endpoint = rdzv_id = ""
        if plan.layout.nodes > 1:
            host = expand_nodelist(task.nodelist)[0]
            check_rendezvous_host(host)
            run_dir = plan.run.dir
            if task.procid == 0:
                endpoint = publish_rendezvous(run_dir, task, host)
            else:
                endpoint = read_rendezvous(run_dir, task)
            rdzv_id = f"{task.job_id}-{task.restarts}"
        argv = torchrun_command(
            plan,
            config_path=str(plan.run.dir.config),
            node_rank=task.procid,
            rdzv_endpoint=endpoint,
            rdzv_id=rdzv_id,
            cache_only=self.cache_only,
        )
        # torchrun is torch.distributed.run, run with this interpreter (whatever PATH holds) through this
        # module's main, which records which worker failed and how (see torchrun_main)
        workers = str(plan.run.dir.worker_failures(task.procid))
        return [sys.executable, "-m", "launcher.node", workers, *argv[1:]]

    def __call__(self) -> dict:
        from launcher.plan import Plan  # noqa: PLC0415  (from the snapshot, like everything here)

        plan = Plan.load(self.plan_path)
        task = SlurmTask.from_env()
        if task.nnodes != plan.layout.nodes:
            raise RuntimeError(f"the plan wants {plan.layout.nodes} node(s) but the job has {task.nnodes}")
        run_dir = plan.run.dir
        if task.procid == 0:
            run_dir.clear_preempted()  # from here on the marker can only mean "this attempt checkpointed"
        for old in (run_dir.node_failure(task.procid), run_dir.worker_failures(task.procid)):
            old.unlink(missing_ok=True)  # an older attempt's failure is history
        signals = _Signals()
        argv = self.torchrun_argv(plan, task)
        _log(task, f"attempt {task.restarts + 1} on {socket.gethostname()}, code {Path(__file__).resolve().parents[1]}")
        _log(task, shlex.join(argv))
        # A rendezvous store per round, so a multi-node group restart does not hang (pytorch#135712); the job
        # script exports the same, this keeps a node entry started by hand safe too.
        env = dict(os.environ, **TORCHRUN_ENV)
        rc = start_torchrun(argv, env=env).wait()
        if rc == 0:
            _log(task, "torchrun finished")
            return {"state": "completed", "run_dir": str(run_dir), "attempt": task.restarts + 1}
        if not (signals.usr2 or workers_preempted(run_dir, task.procid)):
            failure = record_failure(run_dir, task, rc)
            _log(task, f"FAILED: {failure['reason']}")
            raise SystemExit(1)  # that line says it all: no traceback of the node entry
        if not _wait_for(lambda: run_dir.preempted_step() is not None, CHECKPOINT_WAIT_S):
            raise RuntimeError(
                f"SIGUSR2 received and torchrun exited ({rc}), but no preemption checkpoint was "
                f"recorded ({run_dir.preempted} missing after {CHECKPOINT_WAIT_S} s): not requeueing"
            )
        step = run_dir.preempted_step()
        attempt = {"job_id": task.job_id, "restarts": task.restarts}
        if task.procid != 0:
            atomic_write_json(run_dir.node_stopped(task.procid), attempt)
            _log(task, f"checkpoint at step {step} is written; waiting for the requeue")
            _wait_for(lambda: signals.term, REQUEUE_WAIT_S)
            raise SystemExit(EXIT_PREEMPTED)
        others = [run_dir.node_stopped(k) for k in range(1, task.nnodes)]
        if not _wait_for(lambda: all(read_json(p, "node stop") == attempt for p in others), NODES_STOP_WAIT_S):
            _log(task, f"not every node's torchrun exited within {NODES_STOP_WAIT_S} s; requeueing anyway")
        self._requeue(task, plan.profile.max_requeues, step)
        raise SystemExit(EXIT_PREEMPTED)  # no result file: the requeued attempt writes it

    @staticmethod
    def _requeue(task: SlurmTask, max_requeues: int, step: int | None) -> None:
        if task.restarts >= max_requeues:
            _log(
                task,
                f"checkpoint at step {step} written; NOT requeued: already requeued {task.restarts} time(s) "
                f"(max_requeues={max_requeues}). Continue with `launch resubmit`.",
            )
            return
        if shutil.which("scontrol") is None:  # as in many containers: say so rather than try
            _log(
                task,
                f"checkpoint at step {step} written; cannot requeue: no scontrol on this node's PATH. "
                "Continue with `launch resubmit`.",
            )
            return
        # Said first: a successful requeue ends this job step, often before scontrol itself returns.
        _log(task, f"checkpoint at step {step} written; requeueing ({task.restarts + 1}/{max_requeues})")
        try:
            subprocess.run(
                ["scontrol", "requeue", task.requeue_id], check=True, timeout=60, capture_output=True, text=True
            )
        except subprocess.CalledProcessError as e:
            if e.returncode < 0:  # killed by the requeue it asked for
                return
            _log(
                task,
                f"`scontrol requeue {task.requeue_id}` failed ({e.stderr.strip()}). Continue with `launch resubmit`.",
            )
            return
        except (OSError, subprocess.TimeoutExpired) as e:
            _log(task, f"scontrol unusable here ({e}). Continue with `launch resubmit`.")
            return


if __name__ == "__main__":  # the node entry's torchrun: python -m launcher.node FAILURES_JSON TORCHRUN_ARGS...
    torchrun_main(sys.argv[1], sys.argv[2:])
