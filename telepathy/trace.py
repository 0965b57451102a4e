"""Per-GPU peak memory of one real training step, traced on fake tensors: no GPU, no weights, no RAM.

The project's own model (`step.build_telepathy_model(..., meta=True)`: truncated sender, bridge, receiver at
full size) is materialised as fake CPU tensors and runs the trainer's step (TelepathyModel.forward, backward,
gradient clipping, AdamW) under torch's MemTracker, which attributes every storage to parameters, gradients,
optimizer state, activations (created in forward) or temporaries (created in backward). Two steps run and the
statistics are reset after the first, so the peak includes AdamW's state. Under FSDP the model is sharded
by the trainer's own wrapper over a fake process group and FSDPMemTracker adds the all-gather buffers.

Fake "cuda" tensors do not work with the CPU wheel (cpu-torch-stack.md §6), so the trace runs on fake CPU
tensors: the allocations are the same, minus what only a GPU adds (CUDA context, allocator fragmentation),
which telepathy.memory's safety margin covers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType

from telepathy.config import BridgeConfig, DataConfig, RunConfig, TrainConfig
from telepathy.memory import GIB
from telepathy.registry import Pair, load_registry

PHASES = ("sender", "receiver", "optimizer")


class FrozenAwareMemTracker(MemTracker):
    """MemTracker for models with frozen parts, recording which phase of the step holds the peak.

    Stock MemTracker registers a gradient hook on every parameter of each module it meets, which raises
    for frozen ones (cpu-torch-stack.md §6); here hooks go only on parameters that train."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"  # set by the step driver: sender, receiver, optimizer
        self.phase_peaks: dict[str, dict] = {}  # phase -> snapshot at that phase's own peak

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
        params = list(module.parameters())
        if not install_grad_hooks or all(p.requires_grad for p in params):
            return super()._track_module_params_and_buffers(module, install_grad_hooks)
        if not any(p.requires_grad for p in params):
            return super()._track_module_params_and_buffers(module, False)
        totals = [0, 0]
        for sub in module.children():  # a mixed module (the whole model): recurse to uniform parts
            for i, n in enumerate(self._track_module_params_and_buffers(sub, install_grad_hooks)):
                totals[i] += n
        return totals[0], totals[1]

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        phase = "optimizer" if self._in_opt else self.phase
        for snap in self._curr_mem_snap.values():
            best = self.phase_peaks.get(phase)
            if best is None or snap[_TOTAL_KEY] > best[_TOTAL_KEY]:
                self.phase_peaks[phase] = dict(snap)


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
        return {"peak_gib": round(self.peak_gib, 3), "phase": self.phase, "seconds": round(self.seconds, 1),
                "components": {k: round(v, 3) for k, v in self.components.items()},
                "phases": {ph: round(sum(c.values()), 3) for ph, c in self.phases.items()}, "knobs": dict(self.knobs)}


def run_config(pair: Pair, *, backend: str, micro_batch: int, seq_len: int, answer_len: int, bridge: BridgeConfig,
               activation_checkpointing: bool = False, zero_stage: int = 2) -> RunConfig:
    return RunConfig(sender=pair.sender.alias, receiver=pair.receiver.alias, run_dir="/nonexistent", backend=backend,
                     bridge=bridge, train=TrainConfig(micro_batch=micro_batch, zero_stage=zero_stage,
                                                      activation_checkpointing=activation_checkpointing),
                     data=DataConfig(max_length=seq_len, answer_length=answer_len))


def fake_batch(micro_batch: int, seq_len: int, answer_len: int, primer_len: int):
    """A full-length micro-batch (every sender row at seq_len: the padded worst case the planner sizes for).
    Built inside FakeTensorMode: zeros/ones only, fake tensors have no RNG."""
    from telepathy.step import Batch

    b = micro_batch
    return Batch(sender_ids=torch.zeros(b, seq_len, dtype=torch.long), sender_mask=torch.ones(b, seq_len, dtype=torch.long),
                 primer_ids=torch.zeros(b, primer_len, dtype=torch.long),
                 answer_ids=torch.zeros(b, answer_len, dtype=torch.long),
                 answer_mask=torch.ones(b, answer_len, dtype=torch.long))


def _optimizer(model, cfg: RunConfig) -> torch.optim.Optimizer:
    # foreach=True: the CUDA default (the trace runs on CPU tensors, where torch would pick the for-loop).
    return torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                             foreach=True)


def _step(model, optimizer, batch, cfg: RunConfig, tracker: FrozenAwareMemTracker) -> None:
    tracker.phase = "sender"
    with _phase_after(model.sender, tracker, "receiver"):
        out = model(batch)
        out.loss.backward()
    tracker.phase = "optimizer"
    torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.train.grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _phase_after(module: nn.Module | None, tracker: FrozenAwareMemTracker, phase: str):
    """Switch the tracker's phase label when `module` (the sender) returns."""
    if module is None:
        tracker.phase = phase
        yield
        return
    handle = module.register_forward_hook(lambda *_: setattr(tracker, "phase", phase))
    try:
        yield
    finally:
        handle.remove()


def _retie(model: nn.Module) -> None:
    """to_empty gives tied parameters separate storage; tie them again as from_pretrained does."""
    for m in model.modules():
        if hasattr(m, "tie_weights") and hasattr(m, "get_output_embeddings") and m.get_output_embeddings() is not None:
            m.tie_weights()


def _tensors(batch) -> list[torch.Tensor]:
    return [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]


def _breakdown(model, optimizer, snapshot: dict[str, int]) -> dict[str, float]:
    """Tracker categories -> the estimate's components. Parameter bytes split by what trains."""
    def local_bytes(params):
        total = 0
        for p in params:
            t = p.to_local() if hasattr(p, "to_local") else p
            total += t.untyped_storage().nbytes()
        return total

    trainable = local_bytes(model.trainable_parameters())
    opt = snapshot.get(_MemRefType.OPT, 0)
    opt_state = local_bytes(t for st in optimizer.state.values() for t in st.values()
                            if isinstance(t, torch.Tensor) and t.dim() > 0)
    frozen = snapshot.get(_MemRefType.PARAM, 0) - trainable
    return {
        "frozen_weights": frozen / GIB, "bridge_params": trainable / GIB,
        # During optimizer.step the tracker files everything as optimizer state; beyond the state proper
        # (AdamW's moments, counted from the optimizer) it is foreach temporaries.
        "gradients": snapshot.get(_MemRefType.GRAD, 0) / GIB, "optimizer": min(opt, opt_state) / GIB,
        "activations": (snapshot.get(_MemRefType.ACT, 0) + snapshot.get(_MemRefType.BUFFER, 0)
                        + snapshot.get(_MemRefType.OTH, 0)) / GIB,
        "temporaries": (snapshot.get(_MemRefType.TEMP, 0) + max(0, opt - opt_state)) / GIB,
    }


def trace(pair: Pair, *, backend: str = "ddp", world_size: int = 1, micro_batch: int, seq_len: int,
          answer_len: int = 16, primer_len: int = 4, bridge: BridgeConfig = BridgeConfig(),
          activation_checkpointing: bool = False, progress: Callable[[str], None] | None = None) -> TraceResult:
    """Trace two training steps of `pair` at full size on fake tensors; the peak of the second."""
    from telepathy.step import build_telepathy_model

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    cfg = run_config(pair, backend=backend, micro_batch=micro_batch, seq_len=seq_len, answer_len=answer_len,
                     bridge=bridge, activation_checkpointing=activation_checkpointing)
    say(f"building {pair.name} on the meta device")
    model, _, _ = build_telepathy_model(cfg, pair, "meta", meta=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        _retie(model)
        model.train()
        optimizer = _optimizer(model, cfg)
        batch = fake_batch(micro_batch, seq_len, answer_len, primer_len)
        say("step 1 of 2 (creates AdamW state)")
        _step(model, optimizer, batch, cfg, FrozenAwareMemTracker())
        # A fresh tracker for step 2: it starts from what outlives a step (weights, AdamW state, the batch).
        tracker = FrozenAwareMemTracker()
        tracker.track_external(model, optimizer, *_tensors(batch))
        say("step 2 of 2 (traced)")
        with tracker:
            _step(model, optimizer, batch, cfg, tracker)
    phases = {ph: _breakdown(model, optimizer, snap) for ph, snap in tracker.phase_peaks.items()}
    peak = max(phases, key=lambda ph: sum(phases[ph].values()))
    knobs = dict(backend=backend, world_size=world_size, micro_batch=micro_batch, seq_len=seq_len,
                 answer_len=answer_len, primer_len=primer_len, activation_checkpointing=activation_checkpointing)
    return TraceResult(phases[peak], peak, phases, time.perf_counter() - t0, knobs)
