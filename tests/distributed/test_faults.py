"""Faults on the real stack (torchrun, 2 CPU workers, gloo, real files), each asserting what survives.

One run folder takes four SIGKILLs (telepathy/faults.py): mid-bridge-file at step 6, before the manifest at
step 12, after the manifest but before the rename at step 18, and rank 1 in the middle of step 20. The first
start has no restart budget (torchrun fails at the first kill); the next start of the same folder has
--max-restarts=3 and restarts itself from the newest valid checkpoint after each of the other three. Every
loss it logged, recomputed ones included, and the final bridge equal the uninterrupted run's bitwise
(fp32 bridge, tiny_config), and each kill loses at most one checkpoint interval.

A full disk: the run folder on a tmpfs that holds one checkpoint but not two, so the second one (written
before the first is pruned) does not fit: both ranks stop with one `error:` line and exit 2, torchrun ends,
the first checkpoint is intact and still the newest valid one, and nothing partial is left.
"""

import json
import re
import threading
import time
from pathlib import Path

import pytest
import small_disk
import torch
from tiny_run import Background, final_bridge, launch, losses, output, tiny_config, train_records

from telepathy import checkpoint as ckpt

pytestmark = pytest.mark.distributed

STEPS, EVERY = 24, 3
FAULTS = ("checkpoint-bridge@6:0", "checkpoint-manifest@12:0", "checkpoint-rename@18:0", "step@20:1")


class Arrivals:
    """Each train record of the metrics file with the time its line appeared (polled every 20 ms)."""

    def __init__(self, metrics: Path):
        self.metrics, self.seen, self._stop = metrics, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        done, last = 0, False
        while not last:
            last = self._stop.wait(0.02)  # one more read after close(): the lines written since the last one
            text = self.metrics.read_text() if self.metrics.exists() else ""
            lines = text.splitlines()[: text.count("\n")]  # complete lines only
            now = time.time()
            self.seen += [(now, r) for ln in lines[done:] if (r := json.loads(ln))["kind"] == "train"]
            done = len(lines)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def segments(records: list[dict]) -> list[list[dict]]:
    """The train records split where a restart went back to an earlier step."""
    out = [[]]
    for r in records:
        if out[-1] and r["step"] <= out[-1][-1]["step"]:
            out.append([])
        out[-1].append(r)
    return out


def test_killed_writes_and_rank_resume_bitwise(ddp_straight, disk_full_run, tmp_path):
    cfg = tiny_config(tmp_path / "faulty", steps=STEPS, grad_accum=2, checkpoint_every=EVERY)
    run = cfg.dir
    arrivals = Arrivals(run.metrics)
    try:
        # no restart budget: the first kill ends torchrun
        assert launch(cfg, 2, faults=",".join(FAULTS)) != 0, output(cfg)
        assert sorted(p.name for p in run.fault_marker("x").parent.iterdir()) == ["checkpoint-bridge@6:0"]
        partial = run.step(6).tmp
        assert partial.is_dir() and not (partial / "manifest.json").exists()  # the bridge file cut in half
        assert [d.step for d in run.step_dirs()] == [3] and ckpt.latest_valid(run).step == 3
        relaunched = time.time()
        # the next start, with a restart budget for the other three kills
        assert launch(cfg, 2, timeout=480, max_restarts=3, faults=",".join(FAULTS)) == 0, output(cfg)  # 4 starts
    finally:
        arrivals.close()
    assert len(list(run.fault_marker("x").parent.iterdir())) == len(FAULTS)
    assert run.is_complete() and not run.partial_step_dirs() and not list(run.checkpoints.glob(".*"))

    # each start resumed from the newest valid checkpoint; the killed writes' leftovers were removed unread
    log = run.worker_log(0).read_text()
    resumed = [int(m) for m in re.findall(r"resumed from \S+/step_(\d+)\n", log)]
    assert resumed == [3, 9, 15, 18], log
    removed = re.findall(r"removing the partial checkpoint \S+/\.tmp_step_(\d+) ", log)
    assert [int(s) for s in removed] == [6, 12, 18], log
    assert "checkpoints/step_000018 written" in log.split("resumed from")[-2]  # rewritten, not the leftover
    assert output(cfg).count("[telepathy fault]") == len(FAULTS)

    # work lost per kill: the steps completed before it minus the step resumed from
    records = train_records(run.path)
    parts = segments(records)
    assert [p[-1]["step"] for p in parts] == [6, 12, 18, 19, STEPS]
    lost = [done[-1]["step"] - (nxt[0]["step"] - 1) for done, nxt in zip(parts, parts[1:])]
    assert lost == [3, 3, 3, 1] and max(lost) <= EVERY

    # every step logged, recomputed ones too, and the final bridge: bitwise the uninterrupted run's
    straight = ddp_straight.result()
    reference = losses(straight.run_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert all(r["loss"] == reference[r["step"]] for r in records)
    expected, got = final_bridge(straight.run_dir), final_bridge(run.path)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    # time to recover: from the kill (its marker is fsynced just before SIGKILL) to the next group's first
    # step; the first kill's group restarted only when relaunched
    assert [r for _, r in arrivals.seen] == records
    starts = [sum(map(len, parts[:i])) for i in range(1, len(parts))]  # each restarted group's first record
    for fault, first, n in zip(FAULTS, starts, lost):
        recover = arrivals.seen[first][0] - run.fault_marker(fault).stat().st_mtime
        print(f"{fault}: {n} steps lost, first step {recover:.1f} s after the kill")
    print(f"relaunch after {FAULTS[0]}: first step {arrivals.seen[starts[0]][0] - relaunched:.1f} s after it")


@pytest.fixture(scope="module")
def disk_full_run(tmp_path_factory):
    """Started with the module (while the fault runs work): the run folder on a tmpfs that holds one
    checkpoint (2.0 MB) and the run's logs but not a second checkpoint beside it."""
    with small_disk.mounted(tmp_path_factory.mktemp("disk-full") / "small", "3m") as folder:
        run = Background(tiny_config(folder, steps=STEPS, grad_accum=2, checkpoint_every=EVERY))
        yield run
        run.stop()


def test_disk_full_at_a_checkpoint_ends_the_group_with_one_line(disk_full_run):
    cfg = disk_full_run.cfg
    assert disk_full_run.wait(timeout=180) != 0, output(cfg)
    text = output(cfg)
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    head = re.escape(f"error: no space left on {cfg.dir.checkpoints}: checkpoint step 6 needs ")
    pattern = head + r"[\d.]+ MB, [\d.]+ [kM]?B free; " + re.escape(ckpt.NO_SPACE_FIX)
    assert len(errors) == 2 and all(re.fullmatch(pattern, e) for e in errors), text  # one line per worker
    assert text.replace("exitcode  :", "exitcode:").count("exitcode: 2 ") == 2, text  # both workers: UserError
    assert not re.search(r'File "\S*/telepathy/', text), text  # no worker traceback (torchrun prints its own)
    run = cfg.dir
    assert [d.step for d in run.step_dirs()] == [3] and ckpt.verify(run.step(3)) is None
    assert ckpt.latest_valid(run).step == 3
    assert not run.partial_step_dirs() and not list(run.checkpoints.glob(".*"))
    print(f"disk full: {errors[0]} (torchrun ended {disk_full_run.wall_s:.1f} s after its start)")
