"""Per-GPU peak memory of one real training step, traced on fake tensors: no GPU, no weights, no RAM.

The project's own model (`step.build_telepathy_model(..., meta=True)`: truncated sender, bridge, receiver at
full size) is materialised as fake CPU tensors and runs the trainer's step (TelepathyModel.forward, backward,
gradient clipping, AdamW) under torch's MemTracker, which attributes every storage to parameters, gradients,
optimizer state, activations (created in forward) or temporaries (created in backward). Two steps run and
only the second is tracked, so the peak includes AdamW's state. Under FSDP the model is sharded by the
trainer's own wrapper (backends.wrap) over a fake process group and FSDPMemTracker adds the unsharded
parameters and all-gather buffers. Besides the peak, each phase of the step (sender forward; bridge and
receiver forward and backward; bridge backward; optimizer) reports its own peak, which is what the
calibration tests hold telepathy.memory's moments to.

Fake "cuda" tensors do not work with the CPU wheel (the rotary tables fail: "not linked with support for cuda
devices"), so the trace runs on fake CPU tensors: the allocations are the same, minus what only a GPU adds
(CUDA context, allocator fragmentation), which telepathy.memory's safety margin covers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore

from telepathy.backends import wrap
from telepathy.memory import GIB, check_traceable
from telepathy.shape import StepShape
from telepathy.step import Batch, build_telepathy_model


class _PhasePeaks:
    """Records the peak of the whole step and, per phase, the snapshot at that phase's own peak. The step
    driver sets `phase`; optimizer.step is recognised by the tracker's own flag. Replaces MemTracker's
    per-module peak bookkeeping (a pass over every module on every op; module-wise snapshots are not
    used here), which made the trace several times slower."""

    phase = "setup"

    def _update_peak_stats(self, peak_state) -> None:
        if not hasattr(self, "phase_peaks"):
            self.phase_peaks: dict[str, dict] = {}
        phase = "optimizer" if self._in_opt else self.phase
        for dev, snap in self._curr_mem_snap.items():
            total = snap[_TOTAL_KEY]
            if total > self._peak_mem.get(dev, 0):
                self._peak_mem[dev], self._peak_mem_snap[dev] = total, dict(snap)
            best = self.phase_peaks.get(phase)
            if best is None or total > best[_TOTAL_KEY]:
                self.phase_peaks[phase] = dict(snap)


class FrozenAwareMemTracker(_PhasePeaks, MemTracker):
    """MemTracker for a model with frozen parts. Stock MemTracker registers a gradient hook on every
    parameter of each module it meets, which raises for frozen ones ("cannot register a hook on a tensor that
    doesn't require gradient"); here hooks
    go only on parameters that train."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        params = list(module.parameters())
        if not install_grad_hooks or all(p.requires_grad for p in params):
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        if not any(p.requires_grad for p in params):
            return super()._track_module_params_and_buffers(module, False)
        totals = [0, 0]
        for sub in module.children():  # mixed (the whole model): recurse to parts that are all one kind
            for i, n in enumerate(self._track_module_params_and_buffers(sub, install_grad_hooks)):
                totals[i] += n
        return totals[0], totals[1]


class FSDPPhaseTracker(_PhasePeaks, FSDPMemTracker):
    """FSDPMemTracker (sharded/unsharded parameters, all-gather and reduce-scatter buffers) with phases.
    It installs no gradient hooks, so frozen parameters need no special care."""


@dataclass(frozen=True)
class TraceResult:
    """Peak per GPU: its breakdown (GiB), the phase that holds it, and each phase's own peak."""

    components: dict[str, float]
    phase: str
    phases: dict[str, dict[str, float]]
    seconds: float
    knobs: dict = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return sum(self.components.values())

    def to_dict(self) -> dict:
        return {
            "peak_gib": round(self.peak_gib, 3),
            "phase": self.phase,
            "seconds": round(self.seconds, 1),
            "components": {k: round(v, 3) for k, v in self.components.items()},
            "phases": {ph: round(sum(c.values()), 3) for ph, c in self.phases.items()},
            "knobs": dict(self.knobs),
        }


def fake_batch(
    micro_batch: int,
    seq_len: int,
    answer_len: int,
    primer_len: int,
    cached_width: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
):
    """A full-length micro-batch (every sender row at seq_len: the padded worst case the planner sizes for);
    with `cached_width`, cached bf16 sender states instead of sender ids. Built inside FakeTensorMode:
    zeros/ones only, fake tensors have no RNG."""

    b = micro_batch
    ids = torch.zeros(b, seq_len, dtype=torch.long) if cached_width is None else None
    states = None if cached_width is None else torch.zeros(b, seq_len, cached_width, dtype=dtype)
    return Batch(
        sender_ids=ids,
        sender_states=states,
        sender_mask=torch.ones(b, seq_len, dtype=torch.long),
        primer_ids=torch.zeros(b, primer_len, dtype=torch.long),
        answer_ids=torch.zeros(b, answer_len, dtype=torch.long),
        answer_mask=torch.ones(b, answer_len, dtype=torch.long),
    )


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A process group whose collectives do nothing ("fake"), so FSDP and DDP wrap as on `world_size`
    GPUs while this one process traces rank 0."""
    if world_size == 1:
        yield
        return

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Phases:
    """Labels the tracker's phase from hooks: the sender's forward, then the receiver (bridge forward,
    receiver forward and backward), then the bridge's backward (from the gradient of its output);
    optimizer.step is flagged by the tracker itself. `on_phase` hears each change (progress lines)."""

    def __init__(self, model, tracker, on_phase: Callable[[str], None]):
        self.tracker, self.on_phase = tracker, on_phase
        self.handles = [model.bridge.register_forward_hook(self._on_bridge_output)]
        if model.sender is not None:
            self.handles.append(model.sender.register_forward_hook(lambda *_: self._set("receiver")))
        self.first = "sender" if model.sender is not None else "receiver"

    def _set(self, phase: str) -> None:
        self.tracker.phase = phase
        self.on_phase(phase)

    def _on_bridge_output(self, _module, _args, out) -> None:  # returns None: the output stays as it is
        out.register_hook(lambda _grad: self._set("bridge_backward"))

    def __enter__(self):
        self._set(self.first)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.tracker.phase = "done"


def _step(wrapped, batch, tracker, on_phase: Callable[[str], None]) -> None:
    """One optimizer step of the trainer (backends.Wrapped): forward + backward, clip, AdamW, zero_grad."""
    with _Phases(wrapped.model, tracker, on_phase):
        wrapped.micro_step(batch, last=True)
        on_phase("optimizer")
        try:
            wrapped.optimizer_step()
        except DataDependentOutputException:
            # optimizer_step ends by returning the gradient norm as a Python float, which a fake tensor
            # cannot give; check that the step itself (AdamW, zero_grad) completed before it.
            if any(p.grad is not None for p in wrapped.model.trainable_parameters()):
                raise


def materialise(model: nn.Module, device: torch.device) -> None:
    """Meta parameters and buffers -> empty tensors (fake under FakeTensorMode), each shared tensor once.
    Module.to_empty would give tied embeddings two storages and fails on a single-model pair's shared
    modules (a second swap of the same parameter)."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old, kept alive so ids stay unique; new)

    def fresh(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            empty = torch.empty_like(t, device=device)
            done[id(t)] = (
                t,
                nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty,
            )
        return done[id(t)][1]

    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None:
                    table[name] = fresh(t)


def _tensors(batch) -> list[torch.Tensor]:
    return [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).untyped_storage().nbytes() for t in tensors)


def _breakdown(model, optimizer, snapshot: dict) -> dict[str, float]:
    """The tracker's categories (MemTracker's or FSDPMemTracker's) as the estimate's components.
    Parameter bytes are split into frozen and bridge by what trains (local shards under FSDP). While
    optimizer.step runs the tracker files every new tensor as optimizer state; beyond the state proper
    (AdamW's moments, counted from the optimizer) that is temporaries (none for the fused AdamW)."""
    by = {getattr(k, "value", k): v for k, v in snapshot.items()}
    trainable = _local_bytes(model.trainable_parameters())
    opt_state = _local_bytes(
        t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0
    )
    params = by.get("Parameter", 0) + by.get("Sharded Param", 0)
    opt = by.get("Optstate", 0) + by.get("OptState", 0)
    gib = {
        "frozen_weights": params - trainable,
        "bridge_params": trainable,
        "gradients": by.get("Gradient", 0) + by.get("Sharded Grad", 0) + by.get("Unsharded Grad", 0),
        "optimizer": min(opt, opt_state),
        "activations": by.get("Activation", 0) + by.get("Buffer", 0) + by.get("Other", 0) + by.get("Inputs", 0),
        "temporaries": by.get("Temp", 0) + max(0, opt - opt_state),
        "comm_buffers": by.get("Unsharded Param", 0) + by.get("All Gather", 0) + by.get("Reduce Scatter", 0),
    }
    return {k: v / GIB for k, v in gib.items()}


def trace(shape: StepShape, micro_batch: int, progress: Callable[[str], None] | None = None) -> TraceResult:
    """Trace two training steps of `shape` at full size on fake tensors; the peak per GPU of the second.

    The attention is the CPU's (SDPA). DDP: the step of one rank is the same at any world size except for
    the reducer's gradient buckets, which DDP allocates in C++ where fake tensors cannot go; they are added
    as comm_buffers, the size of the bridge's gradients."""

    check_traceable(shape.backend)
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    pair, world = shape.pair, shape.world_size
    sharded = shape.backend == "fsdp" and world > 1
    cfg = shape.run_config(micro_batch)
    say(f"building {pair.name} at full size on the meta device")
    model, _, _ = build_telepathy_model(cfg, pair, "meta", meta=True)
    cpu = torch.device("cpu")
    with fake_process_group(world if sharded else 1), contextlib.ExitStack() as stack:
        if sharded:  # FSDP2 shards the meta model (outside fake mode: the device mesh needs real tensors)
            wrapped = wrap(model, cfg, cpu)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        if sharded:  # materialises only this rank's shards; AdamW keeps its parameters (swapped in place)
            model.to_empty(device=cpu)
        else:
            materialise(model, cpu)
            wrapped = wrap(model, cfg, cpu)
        batch = fake_batch(
            micro_batch,
            shape.seq_len,
            shape.answer_len,
            shape.primer_len,
            pair.sender.hidden if shape.sender_cache else None,
            torch.bfloat16 if shape.compute_dtype == "bf16" else torch.float32,
        )
        say("step 1 of 2 (creates AdamW state)")
        _step(wrapped, batch, _PhasePeaks(), lambda _phase: None)
        # A fresh tracker for step 2 starts from what outlives a step: weights, AdamW state, the batch.
        if sharded:
            tracker = FSDPPhaseTracker(model, wrapped.optimizer)
            tracker.track_inputs(tuple(_tensors(batch)))
        else:
            tracker = FrozenAwareMemTracker()
            tracker.track_external(model, wrapped.optimizer, *_tensors(batch))
        say("step 2 of 2 (traced)")
        with tracker:
            _step(wrapped, batch, tracker, lambda phase: say(f"  {phase} ({time.perf_counter() - t0:.0f} s)"))
        phases = {ph: _breakdown(model, wrapped.optimizer, snap) for ph, snap in tracker.phase_peaks.items()}
        if shape.backend == "ddp" and world > 1:
            buckets = _local_bytes(model.trainable_parameters()) / GIB
            for comps in phases.values():
                comps["comm_buffers"] += buckets
    peak = max(phases, key=lambda ph: sum(phases[ph].values()))
    return TraceResult(
        phases[peak], peak, phases, time.perf_counter() - t0, {"micro_batch": micro_batch, **shape.to_dict()}
    )
