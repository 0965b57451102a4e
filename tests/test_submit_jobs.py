"""The job record and what status/logs read without asking SLURM: id and time parsing, the metrics tail,
finding a run from a path or name, the table. (Real sacct/squeue/scancel: tests/slurm.)"""

import json

import pytest

from launcher import jobs, slurm
from launcher.jobs import JobRecord, TaskRecord
from telepathy.errors import UserError
from telepathy.rundir import RunDir


@pytest.mark.parametrize(
    "text,ids",
    [
        ("12", ["12"]),
        ("15_3", ["15_3"]),
        ("7_[0-1]", ["7_0", "7_1"]),
        ("15_[4-6,9%2]", ["15_4", "15_5", "15_6", "15_9"]),
    ],
)
def test_sacct_job_ids_expand(text, ids):
    assert slurm.expand_job_id(text) == ids


@pytest.mark.parametrize(
    "text,seconds",
    [("00:01:05", 65), ("1-02:00:00", 93600), ("3:07", 187), ("1:00:00", 3600), ("", None), ("INVALID", None)],
)
def test_elapsed(text, seconds):
    assert slurm.elapsed_seconds(text) == seconds


def test_last_train_record_reads_only_the_tail_and_skips_partial_lines(tmp_path):
    lines = [json.dumps({"kind": "train", "step": i, "loss": 1.0 / i}) for i in range(1, 5001)]
    lines.append(json.dumps({"kind": "memory", "step": 5000}))
    RunDir(tmp_path).metrics.write_text("\n".join(lines) + '\n{"kind": "train", "st')  # a line being written
    assert jobs.last_train_record(RunDir(tmp_path), tail_bytes=300)["step"] == 5000
    assert jobs.last_train_record(RunDir(tmp_path / "missing")) is None


def record_at(root, n=2):
    rec = JobRecord(
        root=str(root),
        kind="sweep",
        tasks=[TaskRecord(i, f"00{i}-seed={i}", str(root / f"00{i}-seed={i}")) for i in range(n)],
    )
    rec.tasks[0].jobs += ["40_0", "52"]
    rec.save()
    return rec


def test_record_round_trip_and_selection(tmp_path):
    rec = record_at(tmp_path)
    back = JobRecord.load(tmp_path)
    assert back == rec and back.tasks[0].job_id == "52" and back.tasks[1].job_id is None
    assert [t.index for t in back.select([1])] == [1]
    with pytest.raises(UserError, match="no task 5"):
        back.select([5])
    with pytest.raises(UserError, match="holds no submitted SLURM jobs"):
        JobRecord.load(tmp_path / "000-seed=0")


def test_submitted_root_by_folder_task_folder_or_name(tmp_path):
    record_at(tmp_path / "sw")
    sw = RunDir(tmp_path / "sw")
    assert jobs.submitted_root(str(tmp_path / "sw"), None) == (sw, None)
    assert jobs.submitted_root(str(tmp_path / "sw" / "001-seed=1"), None) == (sw, [1])
    assert jobs.submitted_root("sw", runs_dir=str(tmp_path)) == (sw, None)
    with pytest.raises(UserError, match="no submitted run or sweep"):
        jobs.submitted_root(str(tmp_path / "nope"), runs_dir=str(tmp_path))


def test_log_path_follows_submitit_naming(tmp_path):
    rec = record_at(tmp_path)
    assert jobs.log_path(rec, rec.tasks[0], node=1) == RunDir(tmp_path).slurm / "52_1_log.out"
    rec.tasks[0].jobs.append("60_3")
    assert jobs.log_path(rec, rec.tasks[0]) == RunDir(tmp_path).slurm / "60_3_0_log.out"
    assert jobs.log_path(rec, rec.tasks[1]) is None


def test_status_table_has_every_task():
    rec = JobRecord(root="/r", kind="sweep", tasks=[])
    rows = [
        {
            "index": 0,
            "name": "000-seed=1",
            "job_id": "9_0",
            "state": "RUNNING",
            "nodes": "n1",
            "step": 3,
            "steps": 8,
            "loss": 1.23456,
            "elapsed_s": 75,
            "attempts": 2,
            "complete": False,
        },
        {
            "index": 1,
            "name": "001-seed=2",
            "job_id": None,
            "state": "NOT_SUBMITTED",
            "nodes": None,
            "step": None,
            "steps": 8,
            "loss": None,
            "elapsed_s": None,
            "attempts": 0,
            "complete": True,
        },
    ]
    table = jobs.format_status(rec, rows).splitlines()
    assert table[0] == "sweep /r: 2 task(s)" and table[1].split() == [
        "TASK",
        "NAME",
        "JOB",
        "STATE",
        "NODES",
        "STEP",
        "LOSS",
        "ELAPSED",
        "ATTEMPTS",
    ]
    assert table[2].split() == ["0", "000-seed=1", "9_0", "RUNNING", "n1", "3/8", "1.2346", "1m15s", "2"]
    assert table[3].split()[3:5] == ["NOT_SUBMITTED", "(done)"]


def test_cli_commands_on_a_folder_without_jobs_are_one_line_errors(launch, tmp_path):
    for cmd in ("status", "logs", "cancel", "resubmit"):
        out = launch(cmd, str(tmp_path))
        assert out.returncode == 2 and out.stderr.startswith("error: no submitted run or sweep")
        assert "Traceback" not in out.stderr
