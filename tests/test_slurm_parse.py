"""sacct, squeue and sinfo output of SLURM 22.05, 23.11 and 24.11 (tests/data/slurm/, written from those
releases' man pages) parse to what they say; a line that does not parse is reported, and `launch status`
shows it as a warning, never a traceback."""

import os
from pathlib import Path

import pytest

from launcher import slurm
from launcher.cli import main
from launcher.jobs import JobRecord, TaskRecord

DATA = Path(__file__).parent / "data" / "slurm"
VERSIONS = ("22.05", "23.11", "24.11")
PD = "PENDING"

# job -> (State, NodeList, elapsed seconds, ExitCode, Reason, attempts)
SACCT = {
    "22.05": {
        "4101": ("COMPLETED", "n1", 62, "0:0", None, 1),
        "4102": ("CANCELLED", "n[1-2]", 93784, "0:15", None, 1),  # "CANCELLED by 1000", 1-02:03:04
        "4103": ("RUNNING", "n2", 30, "0:0", None, 3),  # REQUEUED, PREEMPTED, then this attempt
        "4104": (PD, None, 0, "0:0", "Priority", 1),  # "None assigned"
        "4105": ("FAILED", "n1", 3, "1:0", None, 1),
    },
    "23.11": {
        "5200_0": ("COMPLETED", "n1", 120, "0:0", None, 1),
        "5200_1": ("FAILED", "n2", 5, "2:0", None, 1),
        **{f"5200_{i}": (PD, None, 0, "0:0", "JobArrayTaskLimit", 1) for i in range(2, 6)},  # 5200_[2-5%2]
        **{f"5210_{i}": (PD, None, 0, "0:0", "Dependency", 1) for i in (0, 3, 4)},  # 5210_[0,3-4]
        "5300": ("RUNNING", "n1", 180, "0:0", None, 1),  # a heterogeneous job: its leader 5300+0 ...
        "5300+1": ("RUNNING", "n2", 180, "0:0", None, 1),  # ... and its second component, not a 2nd attempt
        "5301": ("RUNNING", "n1", 60, "0:0", None, 2),  # NODE_FAIL, then requeued
    },
    "24.11": {
        "6400": ("OUT_OF_MEMORY", "n1", 40, "0:125", None, 1),
        "6401": ("TIMEOUT", "n[1-2]", 43221, "0:0", None, 1),
        "6402": ("BOOT_FAIL", "n2", 0, "0:0", None, 1),
        "6403": ("DEADLINE", None, 0, "0:0", None, 1),
        "6404": ("REVOKED", None, 0, "0:0", None, 1),
        "6405": ("RUNNING", "n1", 864001, "0:0", None, 1),  # 10-00:00:01; its .interactive step skipped
        "6406": ("SUSPENDED", "n2", 420, "0:0", None, 1),
        "6407": (PD, None, 0, "0:0", "ReqNodeNotAvail, UnavailableNodes:n2", 1),
        "6408_7": ("CANCELLED", None, 0, "0:0", None, 1),  # "CANCELLED by 0" before it started
    },
}
# job -> (State, NodeList, elapsed seconds, Reason); squeue knows no exit code and no earlier attempts
SQUEUE = {
    "22.05": {
        "4103": ("RUNNING", "n2", 30, None),
        "4104": (PD, None, 0, "Priority"),
        "4106": ("COMPLETING", "n1", 3723, "NonZeroExitCode"),
    },
    "23.11": {
        "5200_2": (PD, None, 0, "JobArrayTaskLimit"),
        "5200_3": (PD, None, 0, "JobArrayTaskLimit"),
        "5200_4": ("RUNNING", "n1", 65, None),
        "5200_5": ("RUNNING", "n2", 59, None),
        "5300": ("RUNNING", "n1", 180, None),
        "5300+1": ("RUNNING", "n2", 180, None),
        "5302": ("CONFIGURING", "n1", 1, None),
    },
    "24.11": {
        "6405": ("RUNNING", "n1", 864001, None),
        "6407": (PD, None, 0, "ReqNodeNotAvail, UnavailableNodes:n2"),
        "6409": (PD, None, 0, None),  # "(null)"
        "6410": ("RUNNING", "n2", None, None),  # %M "INVALID" (clock skew)
        "6411": ("REQUEUE_HOLD", None, 0, "JobHeldAdmin"),
        "6412": ("SPECIAL_EXIT", None, 0, "JobHeldUser"),
    },
}
# node -> (partition, default partition, CPUs, memory MB, GPUs, features, state without its flag suffix)
SINFO = {
    "22.05": {
        "n1": ("debug", True, 8, 7680, {"h100": 4}, set(), "idle"),
        "n2": ("debug", True, 8, 7680, {"h100": 4}, set(), "mixed"),
    },
    "23.11": {
        "gpu01": ("gpu", True, 96, 1031000, {"h100": 8}, {"h100", "ib"}, "allocated"),
        "gpu02": ("gpu", True, 96, 1031000, {"h100": 8}, {"h100", "ib"}, "drained"),  # drained* (not responding)
        "cpu01": ("cpu", False, 64, 257000, {}, set(), "idle"),
    },
    "24.11": {
        "gpu01": ("gpu", True, 112, 2063000, {"h100": 8}, {"h100", "ib"}, "mixed"),  # mixed- ; shards not GPUs
        "gpu02": ("gpu", True, 112, 2063000, {"h100": 8}, {"h100", "ib"}, "idle"),  # idle~ (powered off)
        "gpu03": ("gpu", True, 112, 2063000, {"": 8}, set(), "idle"),  # untyped GRES, idle# (powering up)
        "gpu04": ("gpu", True, 112, 2063000, {"h100": 8}, {"h100"}, "planned"),
    },
}


def recorded(tool: str, version: str) -> str:
    return (DATA / f"{tool}-{version}.txt").read_text()


@pytest.mark.parametrize("version", VERSIONS)
def test_recorded_output_of_each_version_parses(version):
    sacct = slurm.parse_sacct(recorded("sacct", version))
    assert sacct.problems == []
    got = {
        k: (r["State"], r["NodeList"], slurm.elapsed_seconds(r["Elapsed"]), r["ExitCode"], r["Reason"], r["attempts"])
        for k, r in sacct.jobs.items()
    }
    assert got == SACCT[version]
    squeue = slurm.parse_squeue(recorded("squeue", version))
    assert squeue.problems == []
    got = {
        k: (r["State"], r["NodeList"], slurm.elapsed_seconds(r["Elapsed"]), r["Reason"]) for k, r in squeue.jobs.items()
    }
    assert got == SQUEUE[version]
    assert all(r["ExitCode"] is None and r["attempts"] == 1 for r in squeue.jobs.values())
    nodes, problems = slurm.parse_sinfo(recorded("sinfo", version))
    assert problems == []
    got = {n.name: (n.partition, n.default, n.cpus, n.mem_mb, n.gpus, set(n.features), n.state) for n in nodes}
    assert got == SINFO[version]


def test_which_states_still_run():
    """A task in one of these is not submitted again; every other recorded state is final."""
    states = {row[0] for table in (*SACCT.values(), *SQUEUE.values()) for row in table.values()}
    active = {s for s in states if slurm.is_active(s)}
    assert active == {PD, "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "REQUEUE_HOLD", "SPECIAL_EXIT"}
    assert slurm.is_active("REQUEUED")  # an earlier attempt's state in --duplicates: the job pends again


BAD = [
    "4101|COMPLETED|n1|00:01:02|0:0",  # a field short (another --format)
    "4101|COMPLETED|n1|00:01:02|0:0|None|extra",  # a field too many
    "JOBID|STATE|NODELIST|ELAPSED|EXITCODE|REASON",  # a header (--noheader missing)
    "CLUSTER: gpu|x|x|x|x|x",  # a multi-cluster banner
    "garbage.0|COMPLETED|n1|00:01:02|0:0|None",  # a step suffix does not make an id
    "12_[1-3|PENDING|None assigned|00:00:00|0:0|None",  # an array range cut short
]


def test_unparsable_lines_are_reported_and_the_rest_still_parses():
    text = "\n".join(BAD[:3]) + "\n" + recorded("sacct", "22.05") + "\n".join(BAD[3:]) + "\n"
    out = slurm.parse_sacct(text)
    assert set(out.jobs) == set(SACCT["22.05"])
    assert len(out.problems) == len(BAD)
    assert all(p.startswith("sacct line ") for p in out.problems)
    assert "got 5" in out.problems[0] and "got 7" in out.problems[1] and "not understood" in out.problems[2]
    squeue = slurm.parse_squeue("4103|RUNNING|n2\n" + recorded("squeue", "22.05"))
    assert set(squeue.jobs) == set(SQUEUE["22.05"]) and len(squeue.problems) == 1


def test_launch_status_warns_about_what_it_could_not_parse(tmp_path, monkeypatch, capsys):
    """The real call path (subprocess, one sacct call, then squeue for the pending job) replaying the 22.05
    recordings with one bad line: status shows the jobs, and the bad line as one `warning:` line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, extra in (("sacct", "4101|COMPLETED|n1\n"), ("squeue", "")):
        recording = tmp_path / f"{tool}.txt"
        recording.write_text(recorded(tool, "22.05") + extra)
        (bin_dir / tool).write_text(f"#!/bin/sh\ncat '{recording}'\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "sweep"
    tasks = [TaskRecord(i, f"t{i}", str(root / f"t{i}"), [job]) for i, job in enumerate(("4101", "4103", "4104"))]
    JobRecord(str(root), "sweep", tasks).save()
    assert main(["status", str(root)]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[3] for line in out.splitlines()[2:]] == ["COMPLETED", "RUNNING", "PENDING"]
    assert "PENDING (Priority)" in out and "3" in out.splitlines()[3].split()[-1]  # 4103: its third attempt
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: SLURM output not understood"), err
    assert "sacct line 15: '4101|COMPLETED|n1'" in warnings[0] and "Traceback" not in err
