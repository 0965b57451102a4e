"""Every backend under real torchrun (2 CPU workers, gloo) follows the single-process trajectory, and a
distributed run preempted by SIGUSR2 on ONE rank resumes to bitwise the same weights.

Tolerance: the bridge is fp32 (tiny_config) and the frozen bf16 models are identical in every process, so
2 workers x 2 accumulation steps see exactly the micro-batches 1 worker x 4 steps sees (sampler contract).
Step 1 therefore matches to 1e-6: only the order of the fp32 gradient sum differs. After an update, a
~1e-7 change in a soft token can flip the bf16 rounding of receiver activations (2^-8 relative steps), and
the bridge's next gradient follows: losses and grad norms drift to ~3e-4 relative by step 4 (measured;
weights < 1e-4 absolute). 1e-3 covers that and still fails on real errors: an unsynchronised or doubly
counted micro-step changes step-1's grad norm (ranks see different halves) or the step-2 loss by far more,
and a wrong 1/world scale shows in grad_norm (Adam itself is scale-invariant, so the loss alone would not)."""

import signal

import psutil
import pytest
import torch
from tiny_run import (
    Background,
    final_bridge,
    finish,
    launch,
    losses,
    output,
    start,
    tiny_config,
    train_records,
    wait_for_step,
)

from telepathy import checkpoint as ckpt
from telepathy.rundir import EXIT_PREEMPTED

pytestmark = pytest.mark.distributed

BACKENDS = {"ddp": {}, "fsdp": {}, "deepspeed-zero2": {"zero_stage": 2}, "deepspeed-zero3": {"zero_stage": 3}}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("single"), grad_accum=4)
    assert launch(cfg, 1) == 0, output(cfg)
    return train_records(cfg.run_dir), final_bridge(cfg.run_dir)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_two_workers_match_one_process(name, single, tmp_path, request):
    if name.startswith("deepspeed"):
        request.getfixturevalue("deepspeed_ops")
    cfg = tiny_config(tmp_path, backend=name.split("-")[0], grad_accum=2, **BACKENDS[name])
    assert launch(cfg, 2) == 0, output(cfg)
    ref, ref_bridge = single
    got = train_records(cfg.run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4]
    bridge = final_bridge(cfg.run_dir)
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)  # same weights, same micro-batches
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-6)
    for field in ("loss", "lm_loss", "diversity", "grad_norm", "lr"):
        assert [r[field] for r in got] == pytest.approx([r[field] for r in ref], rel=1e-3), field
    assert got[-1]["loss"] < got[0]["loss"]
    assert bridge.keys() == ref_bridge.keys()
    for k in bridge:
        torch.testing.assert_close(bridge[k], ref_bridge[k], rtol=0, atol=5e-4, msg=k)  # seen: <1e-4
    assert cfg.dir.is_complete()
    if name == "fsdp":
        _continue_with_ddp(cfg)


def _continue_with_ddp(fsdp_cfg) -> None:
    """An FSDP checkpoint carries full, name-keyed weights and AdamW state: DDP resumes it completely."""
    run_dir = fsdp_cfg.dir
    run_dir.eval.unlink()
    cfg = tiny_config(run_dir.path, backend="ddp", grad_accum=2, steps=5)
    assert launch(cfg, 2) == 0, output(cfg)
    log = run_dir.worker_log(0).read_text()
    assert f"resumed from {run_dir.step(4).path}\n" in log  # not "weights only"
    assert 5 in losses(run_dir.path)


def _signal_rank(proc, rank: int, sig: int) -> None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "telepathy.train" in " ".join(child.cmdline()):
                child.send_signal(sig)
                return
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_preempted_on_one_rank_resumes_bitwise(backend, tmp_path, request):
    steps = 24
    if backend == "ddp":  # shared with the fault tests (conftest.py)
        straight = request.getfixturevalue("ddp_straight")
    else:
        request.getfixturevalue("deepspeed_ops")
        straight = Background(tiny_config(tmp_path / "straight", backend=backend, steps=steps, grad_accum=2))

    cut = tiny_config(tmp_path / "cut", backend=backend, steps=steps, grad_accum=2)
    proc = start(cut, 2)
    wait_for_step(cut.run_dir, 2, proc)
    _signal_rank(proc, 1, signal.SIGUSR2)  # only rank 1 hears it; the per-step all-reduce tells rank 0
    assert finish(proc) != 0
    saved = ckpt.latest_valid(cut.dir)
    assert saved is not None and 2 <= saved.step < steps, output(cut)
    # the data position travels with the checkpoint: `step` global batches (2 ranks x 2 x 2) of epoch 0 consumed
    assert saved.state["sampler"] == {"epoch": 0, "position": saved.step, "global_batch": 8}
    # both ranks checkpointed the same step and exited with the preemption code
    assert output(cut).count(f"preempted: checkpoint at step {saved.step} written") == 2
    assert f"exitcode: {EXIT_PREEMPTED}" in output(cut).replace("exitcode  :", "exitcode:")
    assert cut.dir.preempted_step() == saved.step

    straight = straight.result()
    before = losses(cut.run_dir)  # the steps before the signal: same as the straight run
    assert all(before[s] == losses(straight.run_dir)[s] for s in range(1, saved.step + 1))
    assert launch(cut, 2) == 0, output(cut)
    assert cut.dir.preempted_step() is None
    expected, got = final_bridge(straight.run_dir), final_bridge(cut.run_dir)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    straight_losses, cut_losses = losses(straight.run_dir), losses(cut.run_dir)
    assert all(cut_losses[s] == straight_losses[s] for s in range(saved.step + 1, steps + 1))
