"""Checkpoints: round trip, RNG restore, pruning, crash-safety, fallback past a damaged newest one, and a
full disk (a real 1 MB tmpfs) that stops a save with one line and leaves the previous checkpoint the newest."""

import json
import random
import shutil

import numpy as np
import pytest
import small_disk
import torch

from telepathy import checkpoint as ckpt
from telepathy.errors import UserError
from telepathy.files import format_bytes
from telepathy.rundir import RunDir


@pytest.fixture
def run(tmp_path):
    return RunDir(tmp_path)


def bridge_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def write(run_dir, step, model, opt, keep=2):
    return ckpt.save(
        run_dir,
        step,
        bridge=model.state_dict(),
        optimizer=opt.state_dict(),
        state={"sampler": {"epoch": 0, "position": step}},
        keep=keep,
    )


def test_round_trip(run):
    model, opt = bridge_and_optimizer()
    write(run, 3, model, opt)
    found = ckpt.latest_valid(run)
    assert found.step == 3 and found.path == run.step(3).path
    for k, v in model.state_dict().items():
        assert torch.equal(found.bridge()[k], v)
    other, other_opt = bridge_and_optimizer(seed=1)
    other_opt.load_state_dict(found.optimizer())
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert found.state == {"step": 3, "sampler": {"epoch": 0, "position": 3}}
    d = found.dir
    assert set(json.loads(d.manifest.read_text())["files"]) == {
        p.name for p in (d.bridge, d.optimizer, d.state, d.rng(0))
    }
    assert not list(run.checkpoints.glob(".tmp_*"))


def test_rng_state_restores_every_generator(run):
    model, opt = bridge_and_optimizer()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    write(run, 1, model, opt)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.latest_valid(run).rng(0))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_keeps_the_newest_two(run):
    model, opt = bridge_and_optimizer()
    for step in (10, 20, 30):
        write(run, step, model, opt, keep=2)
    assert [d.step for d in run.step_dirs()] == [30, 20] and len(list(run.checkpoints.iterdir())) == 2


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete_manifest", "delete_file"])
def test_damaged_newest_falls_back_to_previous(run, damage):
    model, opt = bridge_and_optimizer()
    write(run, 10, model, opt)
    newest = write(run, 20, model, opt)
    target = newest.bridge
    if damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete_manifest":
        newest.manifest.unlink()
    else:
        target.unlink()
    assert ckpt.verify(newest) is not None
    assert ckpt.latest_valid(run).step == 10


def test_half_written_checkpoint_is_invisible(run):
    model, opt = bridge_and_optimizer()
    write(run, 10, model, opt)
    # a writer killed before the rename leaves only the temporary folder
    run.step(20).tmp.mkdir()
    (run.step(20).tmp / run.step(20).bridge.name).write_bytes(b"partial")
    assert ckpt.latest_valid(run).step == 10
    write(run, 20, model, opt)  # the next save of that step replaces the leftover
    assert ckpt.latest_valid(run).step == 20


def test_discard_after_removes_unusable_newer_ones(run):
    model, opt = bridge_and_optimizer()
    for step in (10, 20):
        write(run, step, model, opt)
    run.step(20).manifest.unlink()
    assert ckpt.latest_valid(run).step == 10
    ckpt.discard_after(run, 10)
    write(run, 30, model, opt)  # keep=2 now means 10 and 30, not the broken 20 and 30
    assert [d.step for d in run.step_dirs()] == [30, 10]


def test_no_checkpoint(run):
    assert ckpt.latest_valid(run) is None


def test_disk_full_stops_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    """In-process, one rank (the multi-rank case: tests/distributed/test_faults.py). First the free-space check
    (the bridge alone exceeds the disk), then a write that fails although the check passed: a file the estimate
    does not cover (DeepSpeed's own shards, written by write_rank_files) runs into ENOSPC mid-write."""
    with small_disk.mounted(tmp_path / "disk", "1m") as disk:
        run = RunDir(disk / "run")
        model, opt = bridge_and_optimizer()
        write(run, 10, model, opt)
        free = shutil.disk_usage(disk).free
        big = {"w": torch.zeros(300_000)}  # 1.2 MB
        with pytest.raises(UserError) as e:
            ckpt.save(run, 20, bridge=big, optimizer=None, state={}, keep=2)
        assert str(e.value) == (
            f"no space left on {run.checkpoints}: checkpoint step 20 needs 1.3 MB, {format_bytes(free)} free; "
            + ckpt.NO_SPACE_FIX
        )

        def shards(folder):
            torch.save({"z": torch.zeros(400_000)}, folder.path / "zero.pt")  # 1.6 MB

        with pytest.raises(UserError, match=r"^no space left on .*: checkpoint step 20 needs "):
            ckpt.save(run, 20, bridge=model.state_dict(), optimizer=opt.state_dict(), state={}, keep=2,
                      write_rank_files=shards)  # fmt: skip
        assert [d.step for d in run.step_dirs()] == [10] and ckpt.latest_valid(run).step == 10
        assert not run.partial_step_dirs() and not list(run.checkpoints.glob(".*"))
        assert shutil.disk_usage(disk).free == free  # nothing half-written left taking space
        write(run, 20, model, opt)  # the disk is usable again as soon as the checkpoint fits
        assert ckpt.latest_valid(run).step == 20
