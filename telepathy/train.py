"""The worker's main: `python -m telepathy.train --config RUN/config.json`.

Run by one plain process (debug) or by every torchrun worker (RANK / LOCAL_RANK / WORLD_SIZE). A `Trainer`
holds one run's state; its methods run in lifecycle order: set up (process group, data, models, backend)
-> resume from the newest valid checkpoint -> train (accumulation, clipping, warmup + cosine LR, metrics,
periodic checkpoints) -> evaluate on rank 0 -> the evaluation file.

Preemption: SIGUSR2 or SIGTERM only sets a flag. At the next optimizer-step boundary all ranks agree (the
flag rides in the per-step all-reduce, so one signalled rank is enough), write a checkpoint and exit with
EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again"). Under torchrun the workers' 75 shows in torchrun's failure
summary but torchrun itself exits 1, so rank 0 also writes the run folder's preemption marker once the
checkpoint is in place: that is what a node entry waits for before requeueing.

Evaluation runs on rank 0 alone AFTER the process group is shut down, so the other ranks do not sit in a
collective while it generates (the original hit NCCL timeouts exactly there); they exit and torchrun waits.
Where evaluation needs other models than training (a sharded backend, a bridge trained from the sender
cache) the training copy and its optimizer state are released first; the full sender of sender_zero_shot and
text_relay is completed from the training body's layers, not loaded a second time.
Exit codes: 0 done, 75 checkpointed after a signal, 2 user error, 1 anything else.

The run's `method` (config.METHODS) decides what trains: bridge, prompt_tuning and lora by gradient steps
here (same loop, checkpoints, resume and preemption); linear_probe by fitting a classifier on the sender's
tapped states on rank 0; evaluation-only methods train nothing. Every run ends with the evaluation of its
method and `eval.baselines`, written to eval.json and predictions.jsonl, and the seconds spent per phase
(load, cache, train, eval) in the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from telepathy import checkpoint as ckpt
from telepathy import faults, manifest
from telepathy.backends import Wrapped, wrap
from telepathy.bridge_shape import source_layer
from telepathy.cache import sender_cache_for
from telepathy.config import RunConfig
from telepathy.data import Collator, load_task
from telepathy.errors import UserError
from telepathy.evaluate import evaluate, format_eval_table, full_sender, methods_needing
from telepathy.files import atomic_write_json, atomic_write_text, read_json
from telepathy.loading import (
    compute_dtype,
    device_for,
    load_model,
    load_tokenizer,
    local_rank_from_env,
    memory_report,
    select_attention,
)
from telepathy.metrics import MetricsWriter, Progress, eval_record
from telepathy.registry import load_registry
from telepathy.rundir import EXIT_PREEMPTED, RunDir
from telepathy.sampler import StepSampler
from telepathy.secrets import RedactingFilter
from telepathy.step import Batch, TelepathyModel, build_telepathy_model

# Methods trained by gradient steps through the loop below; the linear probe is fitted, the rest only evaluate.
STEPPED = ("bridge", "prompt_tuning", "lora")
PHASES = ("load", "cache", "train", "eval")

DIST_TIMEOUT = timedelta(minutes=30)  # any collective (init included) that waits longer is a hang: fail loudly
log = logging.getLogger("telepathy.train")


class Preempted(Exception):
    """Raised out of `run` after the preemption checkpoint is written (exit code EXIT_PREEMPTED)."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint at step {step} written; resume by running again")
        self.step = step


class StopFlag:
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


def init_distributed() -> tuple[int, int, int | None]:
    """(rank, world, local_rank); joins the torchrun group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = local_rank_from_env()
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank or 0)
            torch.cuda.set_device(device)
            # device_id binds the group to this GPU: NCCL communicators start eagerly, barriers know their device
            dist.init_process_group("nccl", timeout=DIST_TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    return rank, world, local_rank


def log_cpus() -> None:
    """Which CPUs this worker may run on: where a site binds job steps to cores, a step that got too few
    shows here first (every worker of a node on one CPU)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    log.info(
        "cpus: %d allowed (%s) of %d, %d torch threads",
        len(cpus),
        ",".join(map(str, cpus)),
        os.cpu_count() or 0,
        torch.get_num_threads(),
    )


def seed_everything(seed: int) -> None:

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CUDA generators included


class Trainer:
    """One run in this process (every rank builds one). State is declared here, grouped by what it is for;
    the methods follow the run's lifecycle."""

    def __init__(self, cfg: RunConfig, stop: StopFlag):
        # ---- cost: wall seconds per phase of this attempt (the manifest records them)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        # ---- where: this process in the group, and its device
        self.cfg, self.dir, self.stop = cfg, cfg.dir, stop
        self.rank, self.world, self.local_rank = init_distributed()
        self.device = device_for(self.local_rank)
        log_cpus()
        seed_everything(cfg.train.seed)
        # ---- what: the pair, the task and its tokenised train split, the models
        self.pair = load_registry().pair(sender=cfg.sender, receiver=cfg.receiver)
        self.stepped = cfg.method in STEPPED
        self.wrapped: Wrapped | None = None  # the trained model, wrapped for the backend (STEPPED methods)
        self.cache = None  # tapped-layer states read from disk instead of a sender forward (telepathy.cache)
        self.probe = None  # the fitted linear probe (rank 0)
        self.stager: Stager | None = None  # builds the next step's batches while this one computes
        self.metrics: MetricsWriter | None = None
        self.step = 0  # progress: optimizer steps taken
        with self.timed("load"):
            self.task = load_task(cfg.data)
            if not self.stepped:  # evaluation and the probe load their models on rank 0 (evaluate, fit_probe)
                self.tokenizers = (load_tokenizer(self.pair.sender), load_tokenizer(self.pair.receiver))
                return
            model, sender_tok, receiver_tok = build_telepathy_model(cfg, self.pair, self.device)
            self.tokenizers = (sender_tok, receiver_tok)
            d = cfg.data
            self.collator = Collator(
                self.task.spec, sender_tok, receiver_tok, d.max_length, d.answer_length, reads=model.reads
            )
            self.rows = self.collator.tokenize(self.task.train)  # once: sampler lengths, cache key, every batch
        if cfg.train.sender_cache:
            with self.timed("cache"):
                self.cache = sender_cache_for(cfg, self.pair, sender_tok, self.rows, "train", self.device)
        # ---- how: which examples each step reads, the wrapped model with its optimizer, the records
        t = cfg.train
        self.sampler = StepSampler(
            self.rows.lengths(),
            micro_batch=t.micro_batch,
            grad_accum=t.grad_accum,
            world_size=self.world,
            rank=self.rank,
            seed=t.seed,
            length_grouped=t.length_grouped,
        )
        with self.timed("load"):
            self.wrapped = wrap(model, cfg, self.device)
        self.stager = Stager(self._batch, pin=self.device.type == "cuda")

    @contextlib.contextmanager
    def timed(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Restore the newest valid checkpoint (rank 0 verifies, everyone loads)."""
        if self.rank == 0:
            self.dir.evaluation_failed.unlink(missing_ok=True)  # an earlier attempt's
        if not self.stepped:
            self.metrics = MetricsWriter(self.dir, enabled=self.rank == 0)
            return
        found = None
        if self.rank == 0:
            ckpt.remove_partial(self.dir)
            found = ckpt.latest_valid(self.dir)
            if found is not None:
                ckpt.discard_after(self.dir, found.step)
        if self.world > 1:
            box = [found.step if found else None]
            dist.broadcast_object_list(box, src=0)
            found = ckpt.Checkpoint(self.dir.step(box[0])) if box[0] is not None else None
        if found is not None:
            self._check_bridge_layout(found)
            full = self.wrapped.load(found)
            self.sampler.load_state_dict(found.state["sampler"])
            rng = found.rng(self.rank)
            if rng is not None:
                ckpt.set_rng_state(rng)
            self.step = found.step
            log.info(
                "resumed from %s%s",
                found.path,
                ""
                if full
                else " (weights only: optimizer state restarts; it was written by another backend or world size)",
            )
        self.metrics = MetricsWriter(self.dir, enabled=self.rank == 0, resumed_at=self.step)
        self._record_memory(0, "loaded")
        if self.rank == 0:
            self.dir.clear_preempted()

    def _check_bridge_layout(self, found: ckpt.Checkpoint) -> None:
        """A checkpoint of another bridge layout (an older version, other --bridge-* settings) is a one-line
        error, not a load_state_dict traceback."""
        saved = found.bridge_names()
        want = {k.removeprefix("module.") for k in self.wrapped.bridge.state_dict()}
        if saved != want:
            diff = sorted(saved ^ want)
            raise UserError(
                f"checkpoint {found.path} holds another bridge layout ({len(diff)} names differ, e.g. "
                f"{diff[0]}); it cannot resume this run: start a new run (another --name) or remove "
                f"{found.path.parent}"
            )

    # ------------------------------------------------------------------------------------ train
    def train(self) -> None:
        if self.stepped:
            with self.timed("train"):
                self._steps()
        elif self.cfg.method == "linear_probe":
            self.fit_probe()

    def fit_probe(self) -> None:
        """Rank 0: the sender body's pooled states of the train split, and the classifier fitted on them."""
        if self.rank != 0:
            return
        from telepathy import probe  # noqa: PLC0415  (scikit-learn only for the probe)

        body, collator = self._probe_parts()
        with self.timed("train"):
            train = probe.features(body, collator, self.task.train, self.device, self.cfg.eval.batch_size)
            self.probe = probe.fit(train, [e.label for e in self.task.train])
        log.info("linear probe fitted on %d examples x %d features", *train.shape)

    def _probe_parts(self) -> tuple[torch.nn.Module, Collator]:
        if getattr(self, "_probe_body", None) is None:
            with self.timed("load"):
                self._probe_body = self._sender_body()
        d = self.cfg.data
        collator = Collator(self.task.spec, *self.tokenizers, d.max_length, d.answer_length)
        return self._probe_body, collator

    def _steps(self) -> None:
        t = self.cfg.train
        progress = Progress(t.steps, start=self.step, every=t.log_every, enabled=self.rank == 0)
        try:
            while self.step < t.steps:
                record, stop = self.train_step()
                if self.step == 1 or self.step % t.log_every == 0 or self.step == t.steps:
                    self.metrics.write(record)
                if self.step == 1:
                    self._record_memory(1, "first_step")
                progress.update(self.step, f"loss {record['loss']:.4f} lr {record['lr']:.2e}")
                if stop:
                    self.save_checkpoint()
                    if self.rank == 0:
                        self.dir.mark_preempted(self.step)
                    log.warning(
                        "preemption signal: checkpoint at step %d written; exiting with %d", self.step, EXIT_PREEMPTED
                    )
                    raise Preempted(self.step)
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save_checkpoint()
        finally:
            progress.close()

    def train_step(self) -> tuple[dict[str, Any], bool]:
        """One optimizer step over this rank's micro-batches: (metrics record, whether any rank was signalled)."""
        t0 = time.perf_counter()
        lr = self.wrapped.lr  # the rate this step uses (DeepSpeed advances the schedule inside its last micro-step)
        micro = self.sampler.next_step()
        batches = self.stager.take(micro)
        if self.step + 1 < self.cfg.train.steps:
            self.stager.ahead(self.sampler.peek_step())  # built while this step computes
        # [preempt flag, loss, lm_loss, diversity, samples, sender tokens] summed over micro-steps and ranks,
        # kept on the device: one host sync per optimizer step, not one per micro-step
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            out = self.wrapped.micro_step(batch, last=i == len(micro) - 1)
            sums[1:4] += torch.stack([out.loss.detach(), out.lm_loss, out.diversity]).to(torch.float64)
            sums[4] += len(batch)
            sums[5] += batch.input_tokens()
        faults.kill("step", self.step + 1, self.rank, self.dir)
        grad_norm = self.wrapped.optimizer_step()
        self.step += 1
        sums[0] = 1.0 if self.stop.signal is not None else 0.0
        if self.world > 1:
            dist.all_reduce(sums)
        sums = sums.cpu()
        elapsed = time.perf_counter() - t0
        loss, lm_loss, diversity = (sums[1:4] / (len(micro) * self.world)).tolist()
        record = {
            "kind": "train",
            "step": self.step,
            "loss": loss,
            "lm_loss": lm_loss,
            "diversity": diversity,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": sums[4].item() / elapsed,
            "tokens_per_s": sums[5].item() / elapsed,
            "step_time_s": elapsed,
        }
        return record, bool(sums[0] > 0)

    def _batch(self, indices: list[int]) -> Batch:
        batch = self.collator.batch([self.rows[j] for j in indices], [self.task.train[j].label for j in indices])
        return self.cache.attach(batch, indices) if self.cache is not None else batch

    def save_checkpoint(self) -> None:
        """Collective: every rank writes its part."""
        state = {
            "sampler": self.sampler.state_dict(),
            "scheduler": self.wrapped.scheduler_state(),
            "backend": self.wrapped.backend,
            "world_size": self.world,
            "global_batch": self.sampler.global_batch,
        }
        ckpt.save(
            self.dir,
            self.step,
            bridge=self.wrapped.bridge_state(),
            optimizer=self.wrapped.optimizer_state(),
            state=state if self.rank == 0 else None,
            keep=self.cfg.train.keep_checkpoints,
            write_rank_files=self.wrapped.write_rank_files,
        )

    def _record_memory(self, step: int, phase: str) -> None:
        report = memory_report(self.device)
        log.info(
            "memory %s: %s (planner predicted peak %s GiB)",
            phase.replace("_", " "),
            ", ".join(f"{k} {v:.2f}" for k, v in report.items()),
            self.cfg.predicted_peak_gib,
        )
        self.metrics.write(
            {
                "kind": "memory",
                "step": step,
                "phase": phase,
                **report,
                "predicted_peak_gib": self.cfg.predicted_peak_gib,
            }
        )

    # ------------------------------------------------------------------------------------ evaluate
    def evaluate(self) -> dict[str, Any]:
        """Rank 0, after the process group is closed: the run's method and its baselines on the eval split;
        eval.json and predictions.jsonl."""
        bridge_state = None
        if self.wrapped is not None:
            bridge_state = self.wrapped.bridge_state()
            self.wrapped.leave_group()
        close_group()
        if self.rank != 0:
            # Stay until rank 0 is done: ranks that exit at once leave their nodes' torchrun agents in the exit
            # barrier, which gives up after 300 s ("Error waiting on exit barrier") however long evaluation takes.
            wait_for_evaluation(self.dir)
            return {}
        try:
            return self._evaluate(bridge_state)
        except BaseException:
            self.dir.mark_evaluation_failed()  # the waiting ranks stop waiting
            raise

    def _evaluate(self, bridge_state: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.cfg
        methods = [cfg.method] + [m for m in cfg.eval.baselines if m != cfg.method]
        with self.timed("load"):
            model = self._evaluation_model(bridge_state)
            need = methods_needing(methods)
            receiver_lm = model.receiver.lm if model is not None else None
            if receiver_lm is None and need["receiver"]:
                receiver_lm = self._load(self.pair.receiver)
            sender_lm = None
            if need["full_sender"]:
                body = model.sender if model is not None else getattr(self, "_probe_body", None)
                sender_lm = full_sender(
                    self.pair, self.device, cfg.train.attention, body=body, receiver_lm=receiver_lm, dtype=self._dtype
                )
        with self.timed("eval"):
            given = {}
            if cfg.method == "linear_probe":
                from telepathy import probe  # noqa: PLC0415  (scikit-learn only for the probe)

                body, collator = self._probe_parts()
                feats = probe.features(body, collator, self.task.eval, self.device, cfg.eval.batch_size)
                given["linear_probe"] = probe.records(self.probe, feats, self.task.eval, self.task.spec.labels)
            results, records = evaluate(
                methods,
                self.task,
                self.tokenizers,
                cfg.eval,
                self.device,
                data_cfg=cfg.data,
                model=model,
                receiver_lm=receiver_lm,
                sender_lm=sender_lm,
                seed=cfg.train.seed,
                given=given,
            )
        results["method"] = cfg.method
        # predictions first: a run is complete once eval.json exists, and everything it says comes from them
        atomic_write_text(self.dir.predictions, "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_json(self.dir.eval, results)
        with contextlib.closing(MetricsWriter(self.dir)) as m:  # evaluation beside the curves (TensorBoard)
            m.write(eval_record(results, self.step))
        print(format_eval_table(results), flush=True)
        return results

    @property
    def _dtype(self) -> torch.dtype:
        return compute_dtype(self.device, self.cfg.train.precision)[0]

    def _load(self, spec, num_layers: int | None = None) -> torch.nn.Module:
        attn = select_attention(self.device, self.cfg.train.attention)[0]
        return load_model(spec, device=self.device, attn_implementation=attn, num_layers=num_layers, dtype=self._dtype)

    def _sender_body(self) -> torch.nn.Module:
        """The sender up to the tapped layer (what the bridge and the linear probe read)."""
        return self._load(self.pair.sender, num_layers=source_layer(self.cfg.bridge, self.pair.sender))

    def _evaluation_model(self, bridge_state) -> TelepathyModel | None:
        """The trained model, unsharded on this device with its trained weights; None for methods that train
        none. The training copy goes first: its optimizer state always, the whole model where evaluation
        needs another one (sharded frozen weights: backends.FSDPWrapped.local_model rebuilds after releasing
        it). A bridge trained from the sender cache gets its sender body back, beside its receiver."""
        wrapped, self.wrapped, self.cache = self.wrapped, None, None
        if wrapped is None:
            return None
        wrapped.release_optimizer()
        model = wrapped.local_model(bridge_state, self._rebuild)
        del wrapped
        free_memory(self.device)
        if model.method == "bridge" and model.sender is None:
            model.sender = self._sender_body()
        return model.eval()

    def _rebuild(self) -> TelepathyModel:
        """An unsharded model with its sender, on this device (for backends that shard the frozen weights)."""
        plain = self.cfg.replace(backend="ddp", train={"sender_cache": False})
        model, _, _ = build_telepathy_model(plain, self.pair, self.device)
        return model

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
        if self.metrics is not None:
            self.metrics.close()


class Stager:
    """A step's batches (collated, cached states attached, pinned on CUDA) built on a thread while the
    previous step computes, so neither the cache reads nor the pageable host-to-GPU copy sit inside it."""

    def __init__(self, build, *, pin: bool):
        self.build, self.pin = build, pin
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="telepathy-stage")
        self._next: tuple[list[list[int]], Future] | None = None

    def _make(self, micro: list[list[int]]) -> list[Batch]:
        batches = [self.build(indices) for indices in micro]
        return [b.pin_memory() for b in batches] if self.pin else batches

    def take(self, micro: list[list[int]]) -> list[Batch]:
        staged, self._next = self._next, None
        if staged is not None and staged[0] == micro:
            return staged[1].result()
        return self._make(micro)  # first step, or after a resume

    def ahead(self, micro: list[list[int]]) -> None:
        self._next = (micro, self._pool.submit(self._make, micro))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- the run


def run(cfg: RunConfig, *, stop: StopFlag | None = None) -> dict[str, Any]:
    """Train and evaluate one run in this process (all ranks call it under torchrun). Returns the eval
    results on rank 0 ({} on other ranks). Raises Preempted after a signal-triggered checkpoint."""
    run_dir = cfg.dir
    run_dir.path.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    handlers = _setup_logging(run_dir, rank)
    own_flag = stop is None
    stop = stop or StopFlag()
    if own_flag:
        stop.install()
    try:
        if rank == 0 and not run_dir.config.exists():
            cfg.save(run_dir.config)  # in-process callers may not have written it
        if run_dir.is_complete():
            log.info("%s exists: run already complete", run_dir.eval)
            return (read_json(run_dir.eval) or {}) if rank == 0 else {}
        with manifest.recorded(cfg, enabled=rank == 0, preempted=(Preempted,)):
            t0 = time.perf_counter()
            trainer = None
            try:
                trainer = Trainer(cfg, stop)
                try:
                    trainer.resume()
                    trainer.train()  # from the final checkpoint: nothing left, only the evaluation
                finally:
                    trainer.close()
                return trainer.evaluate()
            finally:
                if rank == 0:  # how the attempt's time went, whatever ended it
                    seconds = trainer.seconds if trainer is not None else dict.fromkeys(PHASES, 0.0)
                    world = trainer.world if trainer is not None else int(os.environ.get("WORLD_SIZE", 1))
                    manifest.record_cost(cfg.dir, seconds, time.perf_counter() - t0, _device_kind(), world)
    finally:
        if own_flag:
            stop.uninstall()
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()


def wait_for_evaluation(run_dir: RunDir, poll_s: float = 0.5) -> None:
    """Until rank 0 has written the evaluation (or said it failed). If rank 0's node dies instead, SLURM ends
    the job's other tasks (srun --kill-on-bad-exit) and torchrun ends a local run's."""
    while not (run_dir.eval.exists() or run_dir.evaluation_failed.exists()):
        time.sleep(poll_s)


def build_sender_cache(cfg: RunConfig) -> None:
    """The sender cache of cfg's train split, and nothing else: what a sweep's cache job runs (all ranks,
    each building a slice) before the array that reads it starts."""
    rank, _, local_rank = init_distributed()
    handlers = _setup_logging(cfg.dir, rank)
    try:
        log_cpus()
        pair = load_registry().pair(sender=cfg.sender, receiver=cfg.receiver)
        task = load_task(cfg.data)
        sender_tok, receiver_tok = load_tokenizer(pair.sender), load_tokenizer(pair.receiver)
        rows = Collator(task.spec, sender_tok, receiver_tok, cfg.data.max_length, cfg.data.answer_length).tokenize(
            task.train
        )
        sender_cache_for(cfg, pair, sender_tok, rows, "train", device_for(local_rank))
    finally:
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()


def _setup_logging(run_dir: RunDir, rank: int) -> list[logging.Handler]:
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    run_dir.logs.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir.worker_log(rank))]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(RedactingFilter())  # a library's line that echoes HF_TOKEN=... stays out of the logs
        root.addHandler(h)
    return handlers


def free_memory(device: torch.device) -> None:
    """Return what released models held: Python's cycles first, then the CUDA allocator's cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_kind() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def close_group() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _exit(code: int) -> None:
    """Leave without interpreter finalisation: gloo's threads can abort a process there after a clean run
    (1 run in 4 ended with SIGABRT, 'terminate called without an active exception'), turning success into
    rc=-6."""
    try:
        close_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m telepathy.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the run configuration the launcher wrote into the run folder")
    parser.add_argument("--sender-cache-only", action="store_true", help="build the run's sender cache and stop")
    args = parser.parse_args(argv)
    code = 0
    try:
        if args.sender_cache_only:
            build_sender_cache(RunConfig.load(args.config))
        else:
            run(RunConfig.load(args.config))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(UserError.exit_code)  # no barrier: a rank that did not fail may never reach it
    except Preempted as e:
        print(str(e), file=sys.stderr)
        code = EXIT_PREEMPTED
    except BaseException:  # noqa: BLE001  any other failure: the traceback, then exit 1 without the barrier
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # likewise: torchrun tears the others down
    _exit(code)


if __name__ == "__main__":
    main()
