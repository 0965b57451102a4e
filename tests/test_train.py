"""The worker's loop in one process: schedule, an in-process run end to end, and resuming past a damaged
newest checkpoint. (Exact resume after a real SIGUSR2: tests/distributed/test_backends.py under torchrun, and
on the SLURM cluster.)"""

import json
import math
import shutil

import pytest
from distributed.tiny_run import finish, output, start, tiny_config, train_records

from telepathy import checkpoint as ckpt
from telepathy.backends import lr_factor
from telepathy.config import TrainConfig
from telepathy.errors import UserError
from telepathy.rundir import RunDir
from telepathy.train import run


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    t = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(t, 0) == pytest.approx(0.1)
    assert lr_factor(t, 9) == pytest.approx(1.0)
    assert lr_factor(t, 10) == pytest.approx(1.0)
    assert lr_factor(t, 60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(t, 110) == pytest.approx(0.1)
    assert all(lr_factor(t, s) >= lr_factor(t, s + 1) for s in range(10, 110))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One in-process run, shared (read-only) by the tests below."""
    run_dir = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(run_dir, steps=4, checkpoint_every=2).replace(predicted_peak_gib=1.5)
    return cfg, run(cfg)


def test_in_process_run_trains_checkpoints_and_evaluates(finished):
    cfg, result = finished
    run_dir = cfg.dir
    assert json.loads(run_dir.eval.read_text()) == result
    bridge = result["methods"]["bridge"]  # the accuracy is what the per-class counts of the eval split say
    assert result["n"] == cfg.data.eval_samples == sum(c["n"] for c in bridge["per_class"].values())
    assert bridge["accuracy"] == sum(c["correct"] for c in bridge["per_class"].values()) / result["n"]
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]  # lr 1e-3 on 32 examples: it learns
    assert records[0]["lr"] == pytest.approx(1e-3)  # warmup_steps=1: full rate at the first step
    for r in records:
        assert r["grad_norm"] > 0 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and math.isfinite(r["loss"])
    memory = [
        json.loads(line) for line in run_dir.metrics.read_text().splitlines() if json.loads(line)["kind"] == "memory"
    ]
    assert [m["phase"] for m in memory] == ["loaded", "first_step"]
    assert all(m["predicted_peak_gib"] == 1.5 and m["rss_gib"] > 0 for m in memory)
    assert [d.step for d in run_dir.step_dirs()] == [4, 2]
    assert run_dir.worker_log(0).read_text()
    # a finished run is not trained again
    assert run(cfg) == result and len(train_records(run_dir)) == 4


def test_damaged_newest_checkpoint_falls_back_and_retrains_the_same(finished, tmp_path):
    shutil.copytree(finished[0].run_dir, tmp_path, dirs_exist_ok=True)
    cfg = finished[0].replace(run_dir=str(tmp_path))
    run_dir = cfg.dir
    newest = run_dir.step(4)
    original = ckpt.Checkpoint(newest).bridge()
    newest.bridge.write_bytes(newest.bridge.read_bytes()[:-8] + b"garbage!")
    run_dir.eval.unlink()

    run(cfg)
    log = run_dir.worker_log(0).read_text()
    assert f"{newest.path} is unusable" in log and f"resumed from {run_dir.step(2).path}" in log
    again = ckpt.latest_valid(run_dir)
    got = again.bridge()
    assert again.step == 4, again
    assert {k: (original[k] - got[k]).abs().max().item() for k in original} == {k: 0.0 for k in original}


def test_checkpoint_of_another_bridge_layout_is_a_one_line_error(finished, tmp_path):
    shutil.copytree(finished[0].run_dir, tmp_path, dirs_exist_ok=True)
    RunDir(tmp_path).eval.unlink()
    cfg = finished[0].replace(run_dir=str(tmp_path), bridge={"depth": 2})  # the run had 1 block
    with pytest.raises(UserError, match=r"holds another bridge layout \(\d+ names differ, e.g. blocks\.1\."):
        run(cfg)


def test_sender_cache_trains_like_the_live_sender(finished, tmp_path, monkeypatch):
    monkeypatch.setenv("TELEPATHY_CACHE", str(tmp_path / "cache"))
    live = finished[0]
    cached = tiny_config(tmp_path / "cached", steps=4, checkpoint_every=2, sender_cache=True)
    result = run(cached)
    assert "bridge" in result["accuracy"] and (tmp_path / "cache" / "sender_states").is_dir()
    a, b = train_records(live.run_dir), train_records(cached.run_dir)
    # same first step; later steps within the bf16-receiver noise explained in tests/distributed/test_backends.py
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-3)


def test_bad_run_is_one_line_and_exit_2(tmp_path):
    cfg = tiny_config(tmp_path, micro_batch=4096)  # more than the demo's 2000 training examples
    assert finish(start(cfg, 1)) == 2
    out = output(cfg)
    assert "error: the training set has" in out and "Traceback" not in out


def test_ddp_lets_go_of_the_process_group_before_the_group_is_destroyed(tmp_path):
    """DDP's C++ Reducer holds the process group; were it the group's last holder, dropping the wrapper after
    the group is destroyed joins gloo's worker thread with the GIL held, a deadlock (seen under load at the
    start of evaluation). Trainer.evaluate calls leave_group first: afterwards no DDP object is alive."""
    import gc
    import weakref

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from telepathy.backends import DDPWrapped
    from telepathy.registry import load_registry
    from telepathy.step import build_telepathy_model

    cfg = tiny_config(tmp_path)
    model, _, _ = build_telepathy_model(cfg, load_registry().pair(sender=cfg.sender, receiver=cfg.receiver), "cpu")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = DDPWrapped(model, cfg, torch.device("cpu"))
        ddp = weakref.ref(model.bridge)
        assert isinstance(ddp(), DistributedDataParallel)
        wrapped.leave_group()
        gc.collect()
        assert ddp() is None and model.bridge is wrapped.bridge
    finally:
        dist.destroy_process_group()
