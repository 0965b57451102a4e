"""The worker's main: `python -m telepathy.train --config RUN/config.json`.

Run by one plain process (debug) or by every torchrun worker (RANK / LOCAL_RANK / WORLD_SIZE). Steps:
distributed init -> seed -> task and model -> backend wrap -> resume from the newest valid checkpoint ->
training loop (gradient accumulation, clipping, warmup + cosine LR, metrics, periodic checkpoints) ->
final checkpoint -> evaluation on rank 0 -> RUN/eval.json.

Preemption: SIGUSR2 or SIGTERM only sets a flag. At the next optimizer-step boundary all ranks agree
(the flag rides in the per-step all-reduce, so one signalled rank is enough), write a checkpoint and exit
with EXIT_PREEMPTED; the node entry requeues once that checkpoint is on disk.

Evaluation runs on rank 0 alone AFTER the process group is shut down, so the other ranks do not sit in
a collective while it generates (the original hit NCCL timeouts exactly there); they exit and torchrun
waits for rank 0.

Exit codes: 0 done, EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again") checkpointed after a signal, 2 user error.
Under torchrun the workers' 75 shows in torchrun's failure summary but torchrun itself exits 1, so rank 0
also writes RUN/preempted.json ({"step": n}) once the checkpoint is in place: that file is what a node
entry waits for before requeueing.
This module imports torch inside its functions so the torch-free launcher can import EXIT_PREEMPTED.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from telepathy import manifest
from telepathy.config import RunConfig, atomic_write_text
from telepathy.errors import UserError

EXIT_PREEMPTED = 75
EVAL_FILE = "eval.json"
PREEMPTED_FILE = "preempted.json"  # {"step": n}: written after the preemption checkpoint, removed on resume
DIST_TIMEOUT = timedelta(minutes=30)  # any collective (init included) that waits longer is a hang: fail loudly

log = logging.getLogger("telepathy.train")


class Preempted(Exception):
    """Raised out of `run` after the preemption checkpoint is written (exit code EXIT_PREEMPTED)."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint at step {step} written; resume by running again")
        self.step = step


class _StopFlag:
    """Set by SIGUSR2/SIGTERM; read by the loop at step boundaries (never acted on inside a handler)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. an in-process debug run)
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
            # restart system calls the signal interrupts (SA_RESTART): communication threads in C++
            # (gloo, NCCL, DeepSpeed) should not see EINTR because we only wanted to set a flag
            signal.siginterrupt(sig, False)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------- setup


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _init_distributed() -> tuple[int, int, int | None]:
    """(rank, world, local_rank); joins the torchrun group when WORLD_SIZE > 1."""
    import torch
    import torch.distributed as dist

    from telepathy.loading import local_rank_from_env

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = local_rank_from_env()
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank or 0)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=DIST_TIMEOUT)
    return rank, world, local_rank


def _setup_logging(run_dir: Path, rank: int) -> list[logging.Handler]:
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"worker_rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    return handlers


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA generators included


# ---------------------------------------------------------------------------------------------- the run


def run(cfg: RunConfig, *, stop: _StopFlag | None = None) -> dict[str, Any]:
    """Train and evaluate one run in this process (all ranks call it under torchrun). Returns the eval
    results on rank 0 ({} on other ranks). Raises Preempted after a signal-triggered checkpoint."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank, world, local_rank = _init_distributed()
    handlers = _setup_logging(run_dir, rank)
    own_flag = stop is None
    stop = stop or _StopFlag()
    if own_flag:
        stop.install()
    try:
        with manifest.recorded(cfg, enabled=rank == 0, preempted=(Preempted,)):
            return _run(cfg, run_dir, rank, world, local_rank, stop)
    finally:
        if own_flag:
            stop.uninstall()
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()


def _run(cfg: RunConfig, run_dir: Path, rank: int, world: int, local_rank: int | None,
         stop: _StopFlag) -> dict[str, Any]:
    from telepathy.backends import wrap
    from telepathy.data import Collator, load_task
    from telepathy.loading import device_for, memory_report
    from telepathy.metrics import MetricsWriter
    from telepathy.registry import load_registry
    from telepathy.sampler import StepSampler
    from telepathy.step import build_telepathy_model

    if not (run_dir / "config.json").exists() and rank == 0:
        cfg.save(run_dir / "config.json")  # in-process callers may not have written it
    if (run_dir / EVAL_FILE).exists():
        log.info("%s exists: run already complete", run_dir / EVAL_FILE)
        return json.loads((run_dir / EVAL_FILE).read_text()) if rank == 0 else {}
    t = cfg.train
    device = device_for(local_rank)
    _seed(t.seed)
    pair = load_registry().pair(sender=cfg.sender, receiver=cfg.receiver)
    task = load_task(cfg.data)
    model, sender_tok, receiver_tok = build_telepathy_model(cfg, pair, device)
    collator = Collator(task.spec, sender_tok, receiver_tok, cfg.data.max_length, cfg.data.answer_length)
    sender_rows = collator.tokenize(task.train)  # once: the sampler's lengths, the cache key, every batch
    cache = None
    if t.sender_cache:  # tapped-layer states read from disk instead of a sender forward (telepathy.cache)
        from telepathy.cache import sender_cache_for

        cache = sender_cache_for(cfg, pair, sender_tok, sender_rows, "train", device)
    sampler = StepSampler(sender_rows.lengths(), micro_batch=t.micro_batch, grad_accum=t.grad_accum,
                          world_size=world, rank=rank, seed=t.seed, length_grouped=t.length_grouped)
    wrapped = wrap(model, cfg.backend, cfg, device)
    step = _resume(run_dir, wrapped, sampler, rank, world)
    metrics = MetricsWriter(run_dir, enabled=rank == 0, resumed_at=step)
    loaded = memory_report(device)
    log.info("memory after loading: %s (planner predicted peak %s GiB)", _fmt(loaded), cfg.predicted_peak_gib)
    metrics.write({"kind": "memory", "step": 0, "phase": "loaded", **loaded,
                   "predicted_peak_gib": cfg.predicted_peak_gib})

    if rank == 0:
        (run_dir / PREEMPTED_FILE).unlink(missing_ok=True)
    try:
        if step < t.steps:  # else resumed from the final checkpoint: only the evaluation is missing
            step = _train(cfg, wrapped, sampler, collator, sender_rows, cache, task, device, metrics, stop, step,
                          rank, world)
    finally:
        metrics.close()

    # Final weights on rank 0, then the group is closed before evaluation (see module docstring).
    bridge_state = wrapped.bridge_state()
    _close_group()
    if rank != 0:
        return {}

    def rebuild():
        # unsharded, and with its sender: evaluation reads text, not cached states
        plain = cfg.replace(backend="ddp", train={"sender_cache": False})
        unsharded, _, _ = build_telepathy_model(plain, pair, device)
        return unsharded

    from telepathy.evaluate import evaluate, format_eval_table, full_sender
    from telepathy.report import eval_record

    if cache is not None:
        eval_model = rebuild()
        eval_model.bridge.load_state_dict(bridge_state)
    else:
        eval_model = wrapped.local_model(bridge_state, rebuild)
    eval_model.eval()
    needs_sender = bool({"sender", "text_relay"} & set(cfg.eval.baselines))
    results = evaluate(eval_model, task, (sender_tok, receiver_tok), cfg.eval, device, data_cfg=cfg.data,
                       sender_lm=full_sender(eval_model, pair, device) if needs_sender else None)
    atomic_write_text(run_dir / EVAL_FILE, json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    with contextlib.closing(MetricsWriter(run_dir)) as m:  # evaluation beside the curves (TensorBoard)
        m.write(eval_record(results, step))
    print(format_eval_table(results), flush=True)
    return results


def _resume(run_dir: Path, wrapped, sampler, rank: int, world: int) -> int:
    """Restore the newest valid checkpoint (rank 0 verifies, everyone loads); the step to continue from."""
    import torch.distributed as dist

    from telepathy import checkpoint as ckpt

    found = None
    if rank == 0:
        found = ckpt.latest_valid(run_dir)
        if found is not None:
            ckpt.discard_after(run_dir, found.step)
    if world > 1:
        box = [found.step if found else None]
        dist.broadcast_object_list(box, src=0)
        found = ckpt.Checkpoint(ckpt.step_dir(run_dir, box[0]), box[0]) if box[0] is not None else None
    if found is None:
        return 0
    _check_bridge_keys(found, wrapped.bridge)
    full = wrapped.load(found)
    sampler.load_state_dict(found.state["sampler"])
    rng = found.rng(rank)
    if rng is not None:
        ckpt.set_rng_state(rng)
    log.info("resumed from %s%s", found.path, "" if full else " (weights only: optimizer state restarts; it was "
             "written by another backend or world size)")
    return found.step


def _check_bridge_keys(found, bridge) -> None:
    """A checkpoint of another bridge layout (an older version, other --bridge-* settings) is a one-line
    error, not a load_state_dict traceback."""
    saved = found.bridge_names()
    want = {k.removeprefix("module.") for k in bridge.state_dict()}
    if saved != want:
        diff = sorted(saved ^ want)
        raise UserError(f"checkpoint {found.path} holds another bridge layout ({len(diff)} names differ, e.g. "
                        f"{diff[0]}); it cannot resume this run: start a new run (another --name) or remove "
                        f"{found.path.parent}")


def _train(cfg, wrapped, sampler, collator, sender_rows, cache, task, device, metrics, stop: _StopFlag, step: int,
           rank: int, world: int) -> int:
    import torch
    import torch.distributed as dist

    from telepathy import checkpoint as ckpt
    from telepathy.loading import memory_report
    from telepathy.metrics import Progress

    t = cfg.train
    progress = Progress(t.steps, start=step, every=t.log_every, enabled=rank == 0)

    def save() -> None:
        state = {"sampler": sampler.state_dict(), "scheduler": wrapped.scheduler_state(), "backend": wrapped.backend,
                 "world_size": world, "global_batch": sampler.global_batch}
        ckpt.save(cfg.run_dir, step, bridge=wrapped.bridge_state(), optimizer=wrapped.optimizer_state(),
                  state=state if rank == 0 else None, keep=t.keep_checkpoints,
                  write_rank_files=wrapped.write_rank_files)

    while step < t.steps:
        t0 = time.perf_counter()
        lr = wrapped.lr  # the rate this step uses (DeepSpeed advances the schedule inside its last micro-step)
        micro = sampler.next_step()
        # [preempt flag, loss, lm_loss, diversity, samples, sender tokens] summed over micro-steps and ranks,
        # kept on the device: one host sync per optimizer step, not one per micro-step
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        for i, indices in enumerate(micro):
            batch = collator.batch([sender_rows[j] for j in indices], [task.train[j].label for j in indices])
            if cache is not None:
                batch = cache.attach(batch, indices)
            batch = batch.to(device)
            out = wrapped.micro_step(batch, last=i == len(micro) - 1)
            sums[1:4] += torch.stack([out.loss.detach(), out.lm_loss, out.diversity]).to(torch.float64)
            sums[4] += len(batch)
            sums[5] += batch.sender_mask.sum()
        grad_norm = wrapped.optimizer_step()
        step += 1
        sums[0] = 1.0 if stop.signal is not None else 0.0
        if world > 1:
            dist.all_reduce(sums)
        sums = sums.cpu()
        elapsed = time.perf_counter() - t0
        n_micro = len(micro) * world
        loss, lm_loss, diversity = (sums[1:4] / n_micro).tolist()
        record = {"kind": "train", "step": step, "loss": loss, "lm_loss": lm_loss, "diversity": diversity,
                  "lr": lr, "grad_norm": grad_norm, "samples_per_s": sums[4].item() / elapsed,
                  "tokens_per_s": sums[5].item() / elapsed, "step_time_s": elapsed}
        if step == 1 or step % t.log_every == 0 or step == t.steps:
            metrics.write(record)
        if step == 1:
            first = memory_report(device)
            log.info("memory after the first step: %s (planner predicted peak %s GiB)", _fmt(first),
                     cfg.predicted_peak_gib)
            metrics.write({"kind": "memory", "step": 1, "phase": "first_step", **first,
                           "predicted_peak_gib": cfg.predicted_peak_gib})
        progress.update(step, f"loss {loss:.4f} lr {lr:.2e}")
        if sums[0] > 0:
            save()
            if rank == 0:
                atomic_write_text(Path(cfg.run_dir) / PREEMPTED_FILE, json.dumps({"step": step}) + "\n")
            log.warning("preemption signal: checkpoint at step %d written; exiting with %d", step, EXIT_PREEMPTED)
            progress.close()
            raise Preempted(step)
        if step % t.checkpoint_every == 0 or step == t.steps:
            save()
    progress.close()
    return step


def _fmt(report: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in report.items())


def _close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _exit(code: int) -> None:
    """Leave without interpreter finalisation: gloo's threads can abort the process there after a clean
    run (cpu-torch-stack.md §4, exit flake), turning a success into rc=-6."""
    try:
        _close_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m telepathy.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="RUN/config.json written by the launcher")
    args = parser.parse_args(argv)
    code = 0
    try:
        run(RunConfig.load(args.config))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(UserError.exit_code)  # no barrier: a rank that did not fail may never reach it
    except Preempted as e:
        print(str(e), file=sys.stderr)
        code = EXIT_PREEMPTED
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # likewise: torchrun tears the others down
    _exit(code)


if __name__ == "__main__":
    main()
