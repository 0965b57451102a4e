"""DDP / FSDP2 / DeepSpeed ZeRO behind one interface for the training loop.

`wrap(model, cfg, device)` returns a `Wrapped`: `micro_step(batch, last)` runs forward + backward
(skipping the gradient all-reduce on non-final accumulation micro-steps), `optimizer_step()` clips, steps
AdamW and the LR schedule, and returns the gradient norm. Checkpoint state is gathered to full tensors so a
checkpoint does not depend on the backend that wrote it.

- one process: no wrapper at all (a backend only applies from two processes).
- ddp: only the bridge is wrapped (frozen sender/receiver are plain replicas: DDP on them would all-reduce
  nothing useful and keep buckets); the model calls the DDP module's forward (the original called
  `.module` and bypassed DDP's bookkeeping).
- fsdp: FSDP2 `fully_shard` of every decoder layer, the sender body, the receiver wrapper, the bridge and the
  root; the frozen weights are sharded too (what FSDP is for here).
- deepspeed: a ZeRO-2/3 engine over the bridge only (configs/deepspeed/zero{2,3}.json, "auto" fields filled
  in from the run config). The optimizer is the same torch AdamW + schedule as elsewhere (a DeepSpeed
  client optimizer); DeepSpeed's optimizer state is its own partitioned format (resumable with the same
  backend and world size only).

Every backend trains the same numbers: fp32 bridge weights, gradients (reduced in fp32) and AdamW state,
bf16 compute by the model's own autocast (TelepathyModel.encode). DeepSpeed therefore runs an fp32 engine
(its bf16 mode would keep bf16 weights with fp32 masters, another trajectory), and FSDP2 needs no
MixedPrecisionPolicy (it all-gathers the fp32 bridge shards; the bridge is small next to the frozen models).
ZeRO-3 runs with memory_efficient_linear off: DeepSpeed's replacement for F.linear bypasses autocast.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from telepathy.config import RunConfig, TrainConfig, check_backend
from telepathy.errors import UserError
from telepathy.loading import init_rotary_
from telepathy.paths import config_file
from telepathy.rundir import StepDir
from telepathy.step import Batch, StepOutput, TelepathyModel

log = logging.getLogger(__name__)


def lr_factor(train: TrainConfig, step: int) -> float:
    """Linear warmup to 1, then cosine to `min_lr_ratio` at `steps` (step = optimizer steps taken)."""
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[nn.Parameter], train: TrainConfig):
    # fused: one kernel per step instead of ~10 foreach passes over the bridge (4.5x faster on CPU for
    # an 8M-parameter bridge; no temporaries), with the same update computed in fp32.
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(train, s))
    return optimizer, scheduler


def _full_options(**kw: Any):

    # cpu_offload gathers onto rank 0's CPU only: other ranks get empty dicts and no full copy
    return StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized(), **kw)


class Wrapped:
    """The plain single-process case; DDP, FSDP and DeepSpeed override what differs."""

    backend = "none"

    def __init__(self, model: TelepathyModel, cfg: RunConfig):
        self.model, self.cfg = model, cfg
        self.bridge: nn.Module = model.bridge  # the unwrapped bridge
        self.optimizer, self.scheduler = make_optimizer(model.trainable_parameters(), cfg.train)

    # ------------------------------------------------------------------ stepping

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def micro_step(self, batch: Batch, last: bool) -> StepOutput:
        """Forward + backward of one micro-batch; gradients are reduced across ranks only when `last`."""
        with self._sync(last):
            out = self.model(batch)
            (out.loss / self.cfg.train.grad_accum).backward()
        return out

    def optimizer_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.cfg.train.grad_clip)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor reduced over the mesh
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------------ state (collective calls)

    def bridge_state(self) -> dict[str, torch.Tensor]:
        """Full bridge weights on rank 0's CPU (empty elsewhere)."""

        return get_model_state_dict(self.bridge, options=_full_options())

    def optimizer_state(self) -> dict[str, Any] | None:
        """Full AdamW state keyed by parameter name on rank 0 (portable across plain/DDP/FSDP)."""

        return get_optimizer_state_dict(self.bridge, self.optimizer, options=_full_options())

    def scheduler_state(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def write_rank_files(self, folder: StepDir) -> None:
        """Backend-sharded state every rank writes into a checkpoint folder (DeepSpeed only)."""

    def load(self, ckpt) -> bool:
        """Restore from a checkpoint.Checkpoint; False when only the weights could be restored (the
        optimizer state was written by another backend family)."""

        options = _full_options()
        set_model_state_dict(self.bridge, ckpt.bridge(), options=options)
        optim = ckpt.optimizer()
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        if optim is None:
            return False
        set_optimizer_state_dict(self.bridge, self.optimizer, optim, options=options)
        return True

    # ------------------------------------------------------------------ after training

    def leave_group(self) -> None:
        """Every rank, before the process group is destroyed: let go of what holds the group from C++."""

    def release_optimizer(self) -> None:
        """Drop the optimizer and schedule (AdamW's moments: twice the trained weights in fp32) before
        evaluation, which needs neither."""
        self.optimizer = self.scheduler = None

    def local_model(
        self, bridge_state: dict[str, torch.Tensor], rebuild: Callable[[], TelepathyModel]
    ) -> TelepathyModel:
        """A model rank 0 runs alone after the process group is closed (evaluation): no collectives inside.
        `rebuild()` loads a fresh unsharded model, for backends whose frozen weights are sharded."""
        self.model.bridge = self.bridge
        return self.model


class DDPWrapped(Wrapped):
    backend = "ddp"

    def __init__(self, model: TelepathyModel, cfg: RunConfig, device: torch.device):

        bridge = model.bridge
        ids = [device.index] if device.type == "cuda" else None
        model.bridge = DDP(bridge, device_ids=ids, output_device=device.index if ids else None)
        super().__init__(model, cfg)
        self.bridge = bridge

    def _sync(self, last: bool):
        return contextlib.nullcontext() if last else self.model.bridge.no_sync()

    def leave_group(self) -> None:
        # DDP's C++ Reducer holds the process group. Left as its last holder, destroying the DDP wrapper after
        # the group would run the group's destructor with the GIL held, joining gloo's worker thread while that
        # thread waits for the GIL to free a finished collective's tensors: a deadlock (seen on rank 0 as
        # evaluation unwrapped the bridge). Dropped now, the group's last holder is torch's own registry, which
        # releases the GIL to destroy it.
        self.model.bridge = self.bridge
        gc.collect()


class FSDPWrapped(Wrapped):
    backend = "fsdp"

    def __init__(self, model: TelepathyModel, cfg: RunConfig, device: torch.device):
        mesh = _mesh(device)
        receiver_params = {id(p) for p in model.receiver.parameters()}
        shared = model.sender is not None and any(id(p) in receiver_params for p in model.sender.parameters())
        check_backend("fsdp", single_model=shared, world_size=dist.get_world_size())
        for layer in model.sender_layers() + model.receiver_layers():
            fully_shard(layer, mesh=mesh)
        if model.sender is not None:
            fully_shard(model.sender, mesh=mesh)
        fully_shard(model.receiver, mesh=mesh)
        fully_shard(model.bridge, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # The bridge's backward would prefetch the unit before it in forward order: the sender's remainder,
        # all-gathered for a backward a no-grad sender never runs. FSDP2 takes an empty list as "the default
        # order", so the bridge names itself, already unsharded then: a no-op.
        model.bridge.set_modules_to_backward_prefetch([model.bridge])
        if getattr(model, "fill_from_rank0", False):
            _fill_from_rank0(model, device)
        super().__init__(model, cfg)  # AdamW over the sharded (DTensor) bridge parameters

    def _sync(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def local_model(self, bridge_state, rebuild):
        # Sharded frozen weights cannot run on one rank: rank 0 loads an unsharded copy, after letting go of
        # the sharded one (the caller holds no other reference to it), so the two are never resident together.
        self.model = self.bridge = self.optimizer = self.scheduler = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model = rebuild()
        model.bridge.load_state_dict(bridge_state)
        return model


def _mesh(device: torch.device):
    """One node: shard over its GPUs. Several: HSDP, shard within a node and replicate across nodes, so the
    frozen layers are all-gathered over NVLink, not the inter-node network, in every micro-step."""
    world, per_node = dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    if per_node >= world or world % per_node:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def _fill_from_rank0(model: TelepathyModel, device: torch.device) -> None:
    """Frozen models built on the meta device (step.build_telepathy_model): allocate this rank's shards and
    fill them from rank 0's copy (model.frozen_state) by broadcast, then drop that copy."""
    parts = {name: getattr(model, name) for name in ("sender", "receiver") if getattr(model, name) is not None}
    for part in parts.values():
        part.to_empty(device=device)
    state = model.frozen_state or {}
    for name, part in parts.items():
        set_model_state_dict(
            part, state.get(name, {}), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        init_rotary_(part, device)
    model.frozen_state = None


class DeepSpeedWrapped(Wrapped):
    backend = "deepspeed"

    def __init__(self, model: TelepathyModel, cfg: RunConfig, device: torch.device):
        deepspeed = import_deepspeed()
        bridge = model.bridge  # ZeRO shards only the bridge: the frozen models were loaded straight to this GPU
        self._skeleton = copy.deepcopy(bridge).to("meta")  # shape-only twin for the rank-0 evaluation copy
        self.model, self.cfg = model, cfg
        optimizer, scheduler = make_optimizer(list(bridge.parameters()), cfg.train)
        engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=bridge,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg),
            dist_init_required=False,
        )
        self.engine = engine
        model.bridge = engine
        self.bridge = engine.module
        self._zero3 = cfg.train.zero_stage == 3

    def micro_step(self, batch: Batch, last: bool) -> StepOutput:
        out = self.model(batch)
        self.engine.backward(out.loss)  # the engine divides by gradient_accumulation_steps itself
        self.engine.step()  # optimizer + scheduler only at the accumulation boundary
        return out

    def optimizer_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _gathered(self):
        import deepspeed  # noqa: PLC0415  (optional: only the deepspeed backend needs it)

        if self._zero3:
            return deepspeed.zero.GatheredParameters(list(self.bridge.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def bridge_state(self):
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        with self._gathered():
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.bridge.state_dict().items()} if rank0 else {}
        return state

    def optimizer_state(self):
        return None  # in write_rank_files: DeepSpeed's own partitioned format

    def write_rank_files(self, folder: StepDir) -> None:
        self.engine.save_checkpoint(str(folder.deepspeed), tag="state", save_latest=False)

    def load(self, ckpt) -> bool:
        import deepspeed  # noqa: PLC0415  (optional: only the deepspeed backend needs it)

        saved_world = ckpt.state.get("world_size")
        if ckpt.deepspeed_dir.is_dir() and saved_world == dist.get_world_size():
            self.engine.load_checkpoint(
                str(ckpt.deepspeed_dir), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
            )
            return True
        state = ckpt.bridge()
        dtype = next(self.bridge.parameters()).dtype
        with (
            deepspeed.zero.GatheredParameters(list(self.bridge.parameters()), modifier_rank=0)
            if self._zero3
            else contextlib.nullcontext()
        ):
            if not dist.is_initialized() or dist.get_rank() == 0 or not self._zero3:
                self.bridge.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        self.optimizer.refresh_fp32_params()  # ZeRO keeps its own fp32 copy: refill it from the loaded weights
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        return False

    def local_model(self, bridge_state, rebuild):
        # the engine holds ZeRO's fp32 partitions and moments: it goes once the bridge is moved out of it
        bridge = self._skeleton.to_empty(device=next(self.model.receiver.parameters()).device)
        bridge.load_state_dict(bridge_state)
        self.model.bridge = bridge
        model, self.model, self.engine = self.model, None, None
        return model


def import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        import deepspeed  # noqa: PLC0415  (optional: only the deepspeed backend needs it)
    except ImportError:
        raise UserError(
            "backend deepspeed needs DeepSpeed: pip install telepathy[deepspeed] (or choose --backend ddp or fsdp)"
        ) from None
    return deepspeed


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """configs/deepspeed/zero{stage}.json with its "auto" fields filled in from the run config."""
    path = config_file(f"deepspeed/zero{cfg.train.zero_stage}.json")
    config = json.loads(path.read_text())
    t = cfg.train
    fill = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
    }
    for key, value in fill.items():
        if config.get(key) == "auto":
            config[key] = value
    return config


def wrap(model: TelepathyModel, cfg: RunConfig, device: torch.device) -> Wrapped:
    """The model ready for the training loop under cfg.backend; `model.train()` is set here."""
    model.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return Wrapped(model, cfg)
    return {"ddp": DDPWrapped, "fsdp": FSDPWrapped, "deepspeed": DeepSpeedWrapped}[cfg.backend](model, cfg, device)
