"""The node entry's pieces that need no SLURM: rendezvous naming and the SIGUSR2 hand-off through a
real torchrun (the full protocol runs on the real cluster in tests/slurm)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from launcher.jobs import failure_reason
from launcher.node import (
    RendezvousError,
    SlurmTask,
    check_rendezvous_host,
    expand_nodelist,
    publish_rendezvous,
    read_rendezvous,
    record_failure,
    start_torchrun,
    workers_preempted,
)
from telepathy.rundir import RunDir


def test_slurm_task_from_env_uses_the_array_task_id_for_requeue():
    env = {
        "SLURM_JOB_ID": "107",
        "SLURM_ARRAY_JOB_ID": "100",
        "SLURM_ARRAY_TASK_ID": "7",
        "SLURM_PROCID": "1",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_RESTART_COUNT": "2",
    }
    t = SlurmTask.from_env(env)
    assert (t.job_id, t.requeue_id, t.procid, t.nnodes, t.restarts) == ("107", "100_7", 1, 2, 2)
    plain = SlurmTask.from_env({"SLURM_JOB_ID": "9"})
    assert (plain.requeue_id, plain.procid, plain.nnodes, plain.restarts) == ("9", 0, 1, 0)
    with pytest.raises(RuntimeError, match="inside a SLURM job"):
        SlurmTask.from_env({})


def test_rendezvous_is_published_per_attempt_and_never_aliases(tmp_path):
    """The old port, 20000 + (job + 7 * restarts) % 12000, gave job J after one requeue and job J+7 the same
    port. Now the first node takes a port the kernel says is free and publishes it for this attempt."""
    run = RunDir(tmp_path)
    first = SlurmTask(job_id="100", requeue_id="100", procid=0, nnodes=2, nodelist="n[1-2]", restarts=1)
    other = SlurmTask(job_id="107", requeue_id="107", procid=0, nnodes=2, nodelist="n[1-2]", restarts=0)
    endpoint = publish_rendezvous(run, first, "n1")
    host, port = endpoint.rsplit(":", 1)
    assert host == "n1" and 1024 <= int(port) < 65536
    peer = SlurmTask(job_id="100", requeue_id="100", procid=1, nnodes=2, nodelist="n[1-2]", restarts=1)
    assert read_rendezvous(run, peer, timeout=1) == endpoint  # what every other node of the attempt reads
    with pytest.raises(RendezvousError, match="did not publish"):  # the next attempt never reads a stale one
        read_rendezvous(run, SlurmTask("100", "100", 1, 2, "n[1-2]", restarts=2), timeout=0.5)
    # two jobs alive on one first node at once: the kernel never hands out a port that is bound
    with socket.socket() as held:
        held.bind(("", int(port)))
        assert publish_rendezvous(RunDir(tmp_path / "b"), other, "n1") != endpoint


def test_nodelist_expansion_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # as on clusters whose compute nodes lack scontrol
    assert expand_nodelist("gpu[07-09,12],login1") == ["gpu07", "gpu08", "gpu09", "gpu12", "login1"]


def test_unresolvable_rendezvous_host_is_a_loud_error():
    with pytest.raises(RendezvousError, match="does not resolve"):
        check_rendezvous_host("no-such-node.invalid")


def test_loopback_rendezvous_host_without_slurm_is_refused(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # SLURM cannot confirm that loopback is right
    with pytest.raises(RendezvousError, match="refusing to rendezvous on localhost"):
        check_rendezvous_host("localhost")


WORKER = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1]
    got = []
    signal.signal(signal.SIGUSR2, lambda *a: got.append(1))
    open(os.path.join(out, "ready_" + os.environ["RANK"]), "w").close()
    while not got:
        time.sleep(0.05)
    open(os.path.join(out, "checkpoint_" + os.environ["RANK"]), "w").close()
    deadline = time.monotonic() + 30  # the trainer's barrier after a checkpoint: no rank exits before all wrote
    while len([f for f in os.listdir(out) if f.startswith("checkpoint_")]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(75)
""")


def _run_and_signal_tree(tmp_path, ignore_usr2: bool) -> tuple[int, set[str]]:
    """torchrun with 2 workers; once both are up, SIGUSR2 to every process, as SLURM signals a step."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    argv = [  # torchrun through the node entry's wrapper, which records the workers' failures
        sys.executable,
        "-m",
        "launcher.node",
        str(tmp_path / "failures.json"),
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = start_torchrun if ignore_usr2 else subprocess.Popen
    proc = launch(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready_*"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)
    tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in tree:
        p.send_signal(signal.SIGUSR2)
    rc = proc.wait(timeout=120)
    return rc, {p.name for p in tmp_path.glob("checkpoint_*")}


def test_torchrun_survives_sigusr2_and_its_workers_checkpoint(tmp_path):
    rc, checkpoints = _run_and_signal_tree(tmp_path, ignore_usr2=True)
    assert checkpoints == {"checkpoint_0", "checkpoint_1"}
    assert rc == 1  # torchrun's own "a worker failed" exit, not death by signal (-12)
    # what torchrun knew of each failed worker, as the wrapper recorded it for the node entry
    failed = sorted(json.loads((tmp_path / "failures.json").read_text())["failures"], key=lambda f: f["rank"])
    assert [(f["rank"], f["local_rank"]) for f in failed] == [(0, 0), (1, 1)]
    # the first to exit says 75; torchrun then SIGTERMs the rest, which may not have exited yet
    codes = [f["exitcode"] for f in failed]
    assert 75 in codes and set(codes) <= {75, -signal.SIGTERM}, codes
    # a node whose own SIGUSR2 is late still knows it was preempted: its workers said so
    run = RunDir(tmp_path / "run")
    run.worker_failures(1).parent.mkdir(parents=True)
    assert not workers_preempted(run, 1)
    (tmp_path / "failures.json").rename(run.worker_failures(1))
    assert workers_preempted(run, 1)
    for exitcodes, preempted in (((75, 75), True), ((75, -15), True), ((-15, -15), False), ((75, -9), False)):
        records = [dict(f, exitcode=c) for f, c in zip(failed, exitcodes)]
        run.worker_failures(1).write_text(json.dumps({"failures": records}))
        assert workers_preempted(run, 1) == preempted, exitcodes


def test_the_failure_status_shows_is_the_cause_not_its_echo(tmp_path, monkeypatch):
    """Node 1's rank was SIGKILLed; node 0's rank then exited 1 (its peer vanished) and wrote LATER: status
    names node 1's rank. Another job's record, or an older attempt's, is never shown."""
    run = RunDir(tmp_path)
    for node, workers in ((1, [(1, 0, -9)]), (0, [(0, 0, 1)])):
        failures = [{"rank": r, "local_rank": lr, "exitcode": c, "pid": 1, "timestamp": 5} for r, lr, c in workers]
        run.worker_failures(node).parent.mkdir(exist_ok=True)
        run.worker_failures(node).write_text(json.dumps({"failures": failures}))
        monkeypatch.setenv("SLURMD_NODENAME", f"n{node + 1}")
        record_failure(run, SlurmTask("12", "12", node, 2, "n[1-2]", restarts=1), 1)
    assert failure_reason(run, "12").startswith(
        "rank 1 (on node 1 (n2), local rank 0) was killed by SIGKILL; no checkpoint yet. Continue with `launch resubmit"
    )
    assert failure_reason(run, "13") is None
    record_failure(run, SlurmTask("12", "12", 0, 2, "n[1-2]", restarts=2), -9)  # torchrun itself, a later attempt
    assert failure_reason(run, "12").startswith("torchrun on node 0 (n1) was killed by SIGKILL")


def test_without_the_ignored_disposition_torchrun_dies_of_sigusr2(tmp_path):
    rc, _ = _run_and_signal_tree(tmp_path, ignore_usr2=False)
    assert rc == -signal.SIGUSR2
