"""Analytic per-GPU memory of one training step, by component, in closed form. Torch-free.

The planner calls this for every plan (each --dry-run, each task of a sweep), so it imports nothing heavy.
Every term counts the bytes of tensors the step (telepathy/step.py, driven by telepathy/backends.py)
holds; a fake-tensor trace of that same step (telepathy/trace.py) checks the sum within 5 %
(tests/test_trace.py), and `launch memory --measure` checks it on a GPU.

Peak = max over the moments of a step that can hold it (MOMENTS): the sender's no-grad forward, the
bridge's forward, the receiver's forward and the start of its backward (everything saved for backward is
alive), the bridge's backward, the optimizer step (bridge gradients; the fused AdamW adds no temporaries); under
FSDP also the all-gathers between them. Each moment is fixed + per-sample x micro-batch, so the largest
micro-batch that fits is closed form. Weights, optimizer state and the batch live through all of them.

Sequence lengths: `seq_len` is the sender's input tokens; the receiver reads primer + K soft tokens + answer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

from telepathy.bridge_shape import bridge_param_count, source_layer
from telepathy.config import BridgeConfig
from telepathy.errors import UserError
from telepathy.paths import config_file
from telepathy.registry import ModelSpec, Pair
from telepathy.shape import StepShape

GIB = 2**30
BF16, FP32, INT64 = 2, 4, 8
# Backends telepathy/trace.py can trace (DeepSpeed's ZeRO buffers live outside what the tracker sees).
TRACED_BACKENDS = ("ddp", "fsdp")


def check_traceable(backend: str) -> None:
    if backend not in TRACED_BACKENDS:
        raise UserError(
            f"--trace supports {' and '.join(TRACED_BACKENDS)}; for {backend} use the analytic estimate "
            "(launch memory without --trace)"
        )


# The one definition of usable GPU memory. Profiles give GPU memory in GB (decimal, as sold: "80 GB");
# the estimate is in GiB. Held back: the CUDA context, NCCL and cuBLAS workspaces (fixed) and allocator
# fragmentation (a share of the card). Neither is visible to the tracer nor to this model.
CONTEXT_RESERVE_GIB = 3.0
FRAGMENTATION_SHARE = 0.05

# The moments of a step that can hold its peak, each with the phase of the step it falls in (the tracer
# reports one peak per phase: tests compare a phase's traced peak with its largest moment here).
MOMENTS = {
    "sender_unshard_first": "sender",
    "sender_unshard": "sender",
    "sender": "sender",
    "bridge_unshard": "receiver",
    "bridge_forward": "receiver",
    "bridge_done": "receiver",
    "receiver_unshard": "receiver",
    "receiver_unshard_first": "receiver",
    "receiver_forward": "receiver",
    "receiver_head_unshard": "receiver",
    "receiver_recompute": "receiver",
    "receiver_layer_backward": "receiver",
    "receiver": "receiver",
    "bridge_backward_last": "bridge_backward",
    "bridge_backward": "bridge_backward",
    "optimizer": "optimizer",
}
COMPONENTS = ("frozen_weights", "bridge_params", "gradients", "optimizer", "activations", "temporaries", "comm_buffers")


def gpu_gib(gpu_memory_gb: float) -> float:
    """A profile's GPU memory (decimal GB) in GiB."""
    return gpu_memory_gb * 1e9 / GIB


def safety_margin_gib(gpu_memory_gb: float) -> float:
    """GiB kept free on a GPU of `gpu_memory_gb` GB: the context reserve plus the fragmentation share."""
    return CONTEXT_RESERVE_GIB + FRAGMENTATION_SHARE * gpu_gib(gpu_memory_gb)


def usable_gib(gpu_memory_gb: float, safety_margin: float | None = None) -> float:
    return gpu_gib(gpu_memory_gb) - (safety_margin_gib(gpu_memory_gb) if safety_margin is None else safety_margin)


def margin_text(gpu_memory_gb: float) -> str:
    """How the margin was computed, for CLI output."""
    return (
        f"{gpu_memory_gb:g} GB = {gpu_gib(gpu_memory_gb):.1f} GiB, minus {CONTEXT_RESERVE_GIB:g} GiB (CUDA context, "
        f"NCCL/cuBLAS workspaces) and {FRAGMENTATION_SHARE:.0%} (allocator fragmentation) = "
        f"{usable_gib(gpu_memory_gb):.1f} GiB usable"
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU peak of one training step: GiB by component at the moment that sets it."""

    components: dict[str, float]
    phase: str  # the moment that sets the peak (a key of MOMENTS)
    phases: dict[str, float]  # every moment's total (GiB)
    knobs: dict = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return sum(self.components.values())

    def to_dict(self) -> dict:
        return {
            "total_gib": round(self.total_gib, 3),
            "phase": self.phase,
            "components": {k: round(v, 3) for k, v in self.components.items()},
            "knobs": dict(self.knobs),
        }


@dataclass(frozen=True)
class Line:
    """One moment's memory as fixed + per_sample * micro_batch (GiB)."""

    moment: str
    fixed_gib: float
    per_sample_gib: float

    def at(self, micro_batch: int) -> float:
        return self.fixed_gib + self.per_sample_gib * micro_batch


# ---------------------------------------------------------------------------------------------- shapes


def frozen_param_counts(pair: Pair, bridge: BridgeConfig, sender_cache: bool = False) -> dict[str, int]:
    """Frozen parameters that are built: the sender body up to the tap (embeddings + tapped layers, no
    LM head; the final norm only when every layer runs; none with the sender cache) and the whole
    receiver. A single-model pair holds its weights once."""
    r = pair.receiver.param_counts()
    if pair.single or sender_cache:
        return {"sender": 0, "receiver": r["total"]}
    s = pair.sender.param_counts()
    n = source_layer(bridge, pair.sender)  # decoder layers run: hidden_states[n] needs layers 0..n-1
    sender = s["embed"] + n * s["layer"] + (s["norm"] if n == pair.sender.layers else 0)
    return {"sender": sender, "receiver": r["total"]}


def bridge_params(pair: Pair, bridge: BridgeConfig) -> int:
    return bridge_param_count(bridge, pair.sender.hidden, pair.receiver.hidden)


def _kv(spec: ModelSpec) -> int:
    return spec.kv_heads * spec.head_dim


def _q(spec: ModelSpec) -> int:
    return spec.heads * spec.head_dim


# -------------------------------------------------------------------------------------- per-moment bytes


def _c(st: StepShape) -> int:
    """Bytes per element in the compute dtype: the frozen models' weights and activations, and the
    bridge's autocast activations."""
    return BF16 if st.compute_dtype == "bf16" else FP32


def _autocast(st: StepShape) -> bool:
    return st.compute_dtype != "fp32"


def _inputs(st: StepShape) -> int:
    """The batch (int64 ids and masks; cached bf16 sender states instead of sender ids), alive through
    the whole step."""
    sender = _c(st) * st.pair.sender.hidden if st.sender_cache else INT64
    return st.seq_len * (sender + INT64) + INT64 * (st.primer_len + 2 * st.answer_len)


def _attn_saved_per_token(spec: ModelSpec, attention: str, tokens: int, c: int) -> float:
    """Bytes one attention call saves for backward per query token. SDPA with a padding mask: HF repeats
    k and v to every query head (transformers' sdpa_attention_forward), and the kernel saves q, k, v, the
    output, its fp32 log-sum-exp and the boolean mask converted to the compute dtype. FlashAttention-2
    keeps k and v at their kv-head width and needs no mask. Eager saves the fp32 softmax and its bf16 copy."""
    q, kv, heads = _q(spec), _kv(spec), spec.heads
    if attention == "flash_attention_2":
        return c * (2 * q + 2 * kv) + FP32 * heads
    if attention == "eager":  # repeated q, k, v for the two matmuls; softmax output in fp32 and bf16
        return c * 3 * q + heads * tokens * (FP32 + c)
    return c * 4 * q + FP32 * heads + c * tokens


def _receiver_layer_saved(spec: ModelSpec, attention: str, tokens: int, c: int) -> float:
    """Bytes one receiver decoder layer saves for backward per sample. The weights are frozen, so no Linear
    saves its input (only the weight gradient would need it); what remains is each RMSNorm's fp32 input,
    the attention kernel's tensors and SwiGLU's gate, silu(gate) and up."""
    per_token = 2 * FP32 * spec.hidden + _attn_saved_per_token(spec, attention, tokens, c) + 3 * c * spec.intermediate
    return tokens * per_token


def _sender_tokens_bytes(st: StepShape, hidden_tensors: int) -> float:
    """Per sample in the sender's forward, outside a layer's own work: the batch, `hidden_tensors`
    hidden-size tensors over the sender tokens, and the (s x s) boolean padding mask, which lives
    through the whole forward (FlashAttention-2 needs none)."""
    s = st.seq_len
    mask = 0 if st.attention == "flash_attention_2" else s
    return _inputs(st) + s * (hidden_tensors * _c(st) * st.pair.sender.hidden + mask)


def _sender_layer_peak(st: StepShape) -> float:
    """Per sample, the peak inside a sender layer after the first (no grad): four hidden-size tensors (the
    embedding output, which HF keeps, the layer input, the post-attention residual and the normed input)
    plus SwiGLU's silu(gate), up and their product; or attention's q, repeated k and v, output and rotary
    temporaries, with the kernel's converted mask (SDPA) or the fp32 + bf16 scores (eager)."""
    spec, s, n = st.pair.sender, st.seq_len, st.tapped_layers
    if n == 0:
        return _sender_tokens_bytes(st, 1)
    hidden_tensors = 4 if n >= 2 else 3  # in the first layer the layer input is the embedding output
    c = _c(st)
    mlp = c * (hidden_tensors * spec.hidden + 3 * spec.intermediate)
    attn = c * (3 * spec.hidden + 6 * _q(spec) + 2 * _kv(spec))
    if st.attention == "eager":
        attn += spec.heads * s * (FP32 + c)
    elif st.attention == "sdpa":
        attn += c * s
    return _sender_tokens_bytes(st, 0) + s * max(mlp, attn)


def _bridge_input_saved(st: StepShape) -> float:
    """Per sender token: the input LayerNorm's fp32 input (under autocast a new fp32 copy; in fp32 the
    sender's output itself, new memory unless it is a cached batch tensor) and the input projection's input
    (when the widths differ: the LayerNorm's output in the compute dtype)."""
    d_s, c = st.pair.sender.hidden, _c(st)
    norm_input = 0 if st.sender_cache and not _autocast(st) else FP32 * d_s
    return norm_input + c * d_s * (d_s != st.pair.receiver.hidden)


def _bridge_seq_saved(st: StepShape) -> float:
    """Per sample, what the bridge (telepathy/bridge.py) saves over the sender tokens: the input
    LayerNorm's input, the input projection's input (when the widths differ), the keys (one tensor that
    every block's k and v projections save, cast once to the compute dtype) and per block the k and v
    projections' outputs (saved by attention); plus the keep mask and its per-block converted copies."""
    b = st.bridge
    return st.seq_len * (_bridge_input_saved(st) + _c(st) * st.pair.receiver.hidden * (1 + 2 * b.depth) + 8)


def _latent_block(st: StepShape) -> float:
    """Per sample, what one bridge block saves over the K latents: three LayerNorm inputs in fp32 (the
    residual stream of fp32 latents), and in the compute dtype the MLP's hidden and GELU output (r widths
    each) and 11 more widths: the cross-attention's q-projection input, q, output and out-projection input,
    the self-attention's shared projection input, q, k, v, output and out-projection input, and the
    MLP's input."""
    b = st.bridge
    return b.soft_tokens * st.pair.receiver.hidden * (3 * FP32 + _c(st) * (11 + 2 * b.mlp_ratio))


def _bridge_latent_saved(st: StepShape) -> float:
    """Per sample over the K latents: every block's tensors (_latent_block), then the output RMS-norm's two
    fp32 tensors."""
    return st.bridge.depth * _latent_block(st) + st.bridge.soft_tokens * 2 * FP32 * st.pair.receiver.hidden


def _receiver_saved(st: StepShape) -> float:
    """Per sample, everything saved for backward when the receiver's forward ends: the bridge's tensors,
    the receiver's layers (only each layer's input under activation checkpointing), the final norm's
    fp32 input and log-softmax's fp32 output over the logit rows."""
    R, t = st.pair.receiver, st.receiver_tokens
    layers = R.layers * (
        t * _c(st) * R.hidden if st.activation_checkpointing else _receiver_layer_saved(R, st.attention, t, _c(st))
    )
    return (
        _bridge_seq_saved(st) + _bridge_latent_saved(st) + layers + t * FP32 * R.hidden + st.logit_rows * FP32 * R.vocab
    )


def _bridge_backward(st: StepShape) -> dict[str, dict[str, float]]:
    """Per sample while block k's cross-attention runs backward: the input layers' inputs, the keys,
    blocks 0..k's k/v outputs and blocks 0..k-1's latent tensors are saved; temporaries are the gradients
    of block k's k and v outputs, plus (below the last block) the keys' gradient summed from the blocks
    after it. Block k = depth-1 holds the most saved tensors, block 0 the most gradients (_fixed)."""
    b, d, e = st.bridge, st.pair.receiver.hidden, _c(st)

    def at(k: int) -> dict[str, float]:
        saved = st.seq_len * (_bridge_input_saved(st) + e * d * (1 + 2 * (k + 1))) + k * _latent_block(st)
        grads = 2 + (k < b.depth - 1)
        return {"activations": _inputs(st) + saved, "temporaries": st.seq_len * e * grads * d}

    return {"bridge_backward_last": at(b.depth - 1), "bridge_backward": at(0)}


def _per_sample(st: StepShape) -> dict[str, dict[str, float]]:
    """Per-sample bytes at each moment (MOMENTS) that can hold the peak, by component. The *_unshard
    moments and receiver_forward matter only under FSDP (see _fsdp_comm); otherwise they lie below the
    moment that follows them."""
    R, d, d_s = st.pair.receiver, st.pair.receiver.hidden, st.pair.sender.hidden
    e = _c(st)
    # The sender's output; its caller holds it until the bridge returns (with the cache it is in the batch).
    states = 0 if st.sender_cache else st.seq_len * e * d_s
    bridge = _bridge_seq_saved(st) + _bridge_latent_saved(st)
    layer = _receiver_layer_saved(R, st.attention, st.receiver_tokens, e)
    sender = (
        {m: {"activations": _inputs(st)} for m in ("sender_unshard_first", "sender_unshard", "sender")}
        if st.sender_cache
        else {
            "sender_unshard_first": {"activations": _sender_tokens_bytes(st, 1)},
            "sender_unshard": {"activations": _sender_tokens_bytes(st, 2)},
            "sender": {"activations": _sender_layer_peak(st)},
        }
    )
    return {
        **sender,
        "bridge_unshard": {"activations": _inputs(st) + states},
        # The last block's cross-attention forward: two widths of transients beside what it saves.
        "bridge_forward": {"activations": _inputs(st) + states + bridge, "temporaries": st.seq_len * e * 2 * d},
        # The bridge's forward done, before FSDP reshards it: everything it saved, the sender's states still held.
        "bridge_done": {"activations": _inputs(st) + states + bridge},
        "receiver_unshard": {"activations": _inputs(st) + bridge},
        "receiver_unshard_first": {"activations": _inputs(st) + bridge},
        "receiver_forward": {
            "activations": _inputs(st)
            + _receiver_saved(st)
            - layer
            - st.logit_rows * FP32 * R.vocab
            - st.receiver_tokens * FP32 * R.hidden
        },
        # Backward re-gathers the receiver's head (its remainder) with everything saved.
        "receiver_head_unshard": {"activations": _inputs(st) + _receiver_saved(st)},
        # Activation checkpointing: one layer recomputed beside every layer's input (without checkpointing
        # this moment is receiver_layer_backward without its temporaries).
        "receiver_recompute": {
            "activations": _inputs(st)
            + _receiver_saved(st)
            + layer * st.activation_checkpointing
            - st.logit_rows * FP32 * R.vocab
        },
        # The last layer's backward, the loss's tensors freed: gradients of three intermediate-size tensors.
        "receiver_layer_backward": {
            "activations": _inputs(st) + _receiver_saved(st) - st.logit_rows * FP32 * R.vocab,
            "temporaries": st.receiver_tokens * 3 * e * R.intermediate,
        },
        # Backward starts with the loss: the gradients of log-softmax's output and input exist together
        # while its output is still saved; the soft tokens' gradient from the diversity term waits.
        "receiver": {
            "activations": _inputs(st) + _receiver_saved(st),
            "temporaries": st.logit_rows * 2 * FP32 * R.vocab + st.bridge.soft_tokens * d * FP32,
        },
        # The bridge's backward over the sender tokens, in the cross-attention k/v projection of its last
        # block and of its first (see _bridge_backward).
        **_bridge_backward(st),
        "optimizer": {"activations": _inputs(st)},
    }


def _fsdp_units(st: StepShape) -> dict[str, float]:
    """Bytes of each FSDP2 unit backends.FSDPWrapped shards, unsharded: a decoder layer of each model,
    each model's remainder (embeddings, final norm, LM head) and the bridge."""
    S, R = st.pair.sender.param_counts(), st.pair.receiver.param_counts()
    n, built = st.tapped_layers, not st.sender_cache
    c = _c(st)
    return {
        "sender_layer": c * S["layer"] * built,
        "receiver_layer": c * R["layer"],
        "sender_root": c * (S["embed"] + (S["norm"] if n == st.pair.sender.layers else 0)) * built,
        "receiver_root": c * (R["embed"] + R["norm"] + R["lm_head"]),
        "bridge": FP32 * bridge_params(st.pair, st.bridge),  # fp32 master weights (autocast casts per use)
    }


def _fsdp_comm(st: StepShape) -> dict[str, float]:
    """Unsharded parameters and all-gather buffers per moment under FSDP2 (_fsdp_param_group.py), as the
    fake-tensor trace sees them. A unit's parameters are gathered into a buffer, then copied out into
    the unsharded parameters; in forward the buffer is freed only at the next unit's copy-out, so a
    unit's copy-out holds the previous unit's buffer, its running parent's parameters (a model's
    remainder stays unsharded while its layers run) and its own buffer and parameters (*_unshard*).
    In backward each unit prefetches the unit before it in forward order, except the bridge: its
    predecessor is the no-grad sender, which has no backward."""
    u = _fsdp_units(st)
    s_root, s_layer, r_root, r_layer, b = (
        u["sender_root"],
        u["sender_layer"],
        u["receiver_root"],
        u["receiver_layer"],
        u["bridge"],
    )
    n = st.tapped_layers
    return {
        "sender_unshard_first": 2 * s_root + (2 * s_layer if n else 0),  # first layer's copy-out
        "sender_unshard": s_root + 3 * s_layer if n >= 2 else 0.0,  # a later layer's copy-out
        "sender": s_root + (2 * s_layer if n else 0),  # a layer running: its parameters and buffer
        "bridge_unshard": (s_layer if n and s_layer else s_root) + 2 * b,
        "bridge_forward": 2 * b,
        "bridge_done": 2 * b,
        "receiver_unshard": b + 2 * r_root,
        "receiver_unshard_first": 2 * r_root + 2 * r_layer,
        "receiver_forward": r_root + 3 * r_layer,  # the last layer's copy-out
        "receiver_head_unshard": 2 * r_root,  # backward re-gathers the head: its buffer and parameters
        "receiver_recompute": r_root + 2 * r_layer,
        "receiver": r_root + r_layer,  # the loss's backward: the head unsharded, the last layer prefetched
        "receiver_layer_backward": r_root + 2 * r_layer,  # the last layer, and the one before prefetched
        "bridge_backward_last": b,  # no prefetch of the no-grad sender (backends.FSDPWrapped)
        "bridge_backward": b,
        "optimizer": 0.0,
    }


@functools.lru_cache(maxsize=4)
def _zero_config(stage: int) -> dict:
    """zero_optimization of configs/deepspeed/zero{stage}.json (the file the trainer hands DeepSpeed)."""
    path = config_file(f"deepspeed/zero{stage}.json")
    try:
        return json.loads(path.read_text()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); restore configs/deepspeed/") from None


def _autocast_weights(st: StepShape) -> dict[str, float]:
    """Bytes of the compute-dtype copies autocast makes of the bridge's Linear weights, per moment: made at
    each weight's first use in forward, kept (saved for the input gradient) until that layer's backward.
    Bias copies are freed when autocast exits (addmm saves no bias)."""
    if not _autocast(st):
        return {}
    b, d, r = st.bridge, st.pair.receiver.hidden, st.bridge.mlp_ratio
    proj = st.pair.sender.hidden * d * (st.pair.sender.hidden != d)
    block = 2 * 4 * d * d + 2 * r * d * d
    whole = proj + b.depth * block
    c = _c(st)
    receiver = c * whole
    return {
        # the last block's cross-attention forward: everything before it, and its own q, k, v
        "bridge_forward": c * (proj + (b.depth - 1) * block + 3 * d * d),
        **{m: receiver for m, phase in MOMENTS.items() if phase == "receiver" and not m.startswith("bridge")},
        "bridge_done": receiver,
        # the k/v projections' backward of the last block, and of the first
        "bridge_backward_last": c * (proj + (b.depth - 1) * block + 2 * d * d),
        "bridge_backward": c * (proj + 2 * d * d),
    }


def _fixed(st: StepShape) -> dict[str, dict[str, float]]:
    """Batch-independent bytes per GPU at each moment (see _per_sample), by component."""
    frozen = sum(frozen_param_counts(st.pair, st.bridge, st.sender_cache).values())
    p = bridge_params(st.pair, st.bridge)
    w, e = st.world_size, FP32
    # The bridge trains fp32 master weights: parameters, gradients and both AdamW moments in fp32; the fused
    # AdamW (backends.make_optimizer) updates in place, with no temporaries. Frozen weights: compute dtype.
    resident = {"frozen_weights": _c(st) * frozen, "bridge_params": e * p, "optimizer": 2 * e * p}
    grads = backward_grads = e * p
    comm = dict.fromkeys(_fsdp_comm(st), 0.0)
    if st.backend == "ddp" and w > 1:
        # DDP's reducer keeps its own gradient buckets, as large as the bridge's gradients, for the run.
        comm = dict.fromkeys(comm, e * p)
    elif st.backend == "fsdp" and w > 1:
        # Everything sharded over the world; the bridge's gradients are whole until its reduce-scatter.
        resident = {k: v / w for k, v in resident.items()}
        grads = grads / w
        comm = _fsdp_comm(st)
    elif st.backend == "deepspeed":
        # Only the bridge is the DeepSpeed engine: the frozen models stay replicated. ZeRO keeps an fp32
        # master copy, fp32 Adam moments and an fp32 gradient partition, sharded over the world (stage 2
        # and 3), and gathers gradients through a bucket of reduce_bucket_size elements; stage 3 also
        # shards the bridge's parameters and gathers them per module ahead of use (prefetch bucket).
        zero = _zero_config(st.zero_stage)
        resident["optimizer"] = 3 * FP32 * p / w
        grads = backward_grads = FP32 * p / w + e * min(p, zero.get("reduce_bucket_size", p))
        if st.zero_stage == 3:
            resident["bridge_params"] = e * p / w + e * min(p, zero.get("stage3_prefetch_bucket_size", p))
    copies = _autocast_weights(st)
    out = {
        moment: {**resident, "comm_buffers": c, "activations": copies.get(moment, 0.0)} for moment, c in comm.items()
    }
    out["bridge_backward"]["gradients"] = backward_grads
    # In the last block's backward, the gradients of the earlier blocks and the input layers are still to come.
    block = p - bridge_params(st.pair, dataclasses.replace(st.bridge, depth=st.bridge.depth - 1))
    inputs = bridge_params(st.pair, dataclasses.replace(st.bridge, depth=0, soft_tokens=0)) - 1  # norm + projection
    out["bridge_backward_last"]["gradients"] = backward_grads * (p - (st.bridge.depth - 1) * block - inputs) / p
    out["optimizer"]["gradients"] = grads
    return out


def _by_moment(st: StepShape, micro_batch: int) -> dict[str, dict[str, float]]:
    """GiB by moment and component at `micro_batch`."""
    fixed, per = _fixed(st), _per_sample(st)
    out = {}
    for moment in MOMENTS:
        comp = dict.fromkeys(COMPONENTS, 0.0)
        for c, v in fixed[moment].items():
            comp[c] += v / GIB
        for c, v in per[moment].items():
            comp[c] += micro_batch * v / GIB
        out[moment] = comp
    return out


# -------------------------------------------------------------------------------------------- public API


def estimate(shape: StepShape, micro_batch: int) -> MemoryEstimate:
    """Per-GPU peak memory of one training step of `shape` at `micro_batch`: GiB by component at the
    moment that sets the peak."""
    if micro_batch < 0:
        raise UserError(f"micro-batch must be >= 0 (got {micro_batch})")
    moments = _by_moment(shape, micro_batch)
    peak = max(moments, key=lambda m: sum(moments[m].values()))
    return MemoryEstimate(
        moments[peak],
        peak,
        {m: sum(c.values()) for m, c in moments.items()},
        {"micro_batch": micro_batch, **shape.to_dict()},
    )


def peak_lines(shape: StepShape) -> list[Line]:
    """Each moment as fixed + per-sample GiB."""
    zero, one = estimate(shape, 0).phases, estimate(shape, 1).phases
    return [Line(p, zero[p], one[p] - zero[p]) for p in zero]


def max_micro_batch(shape: StepShape, gpu_memory_gb: float, safety_margin_gib: float | None = None) -> int:
    """The largest micro-batch whose estimate fits the usable memory (`usable_gib`); 0 if none does."""
    budget = usable_gib(gpu_memory_gb, safety_margin_gib)
    lines = peak_lines(shape)
    if any(line.fixed_gib > budget for line in lines):
        return 0
    n = min(int((budget - line.fixed_gib) / line.per_sample_gib) for line in lines if line.per_sample_gib > 0)
    while n > 0 and max(line.at(n) for line in lines) > budget:  # float rounding at the boundary
        n -= 1
    return n


def frozen_weights_gib(shape: StepShape) -> float:
    """The frozen weights alone, per GPU under the shape's backend."""
    return estimate(shape, 0).components["frozen_weights"]


def weights_fit(shape: StepShape, gpu_memory_gb: float) -> bool:
    """False when the frozen weights alone (per GPU under the shape's backend) exceed the usable memory."""
    return frozen_weights_gib(shape) <= usable_gib(gpu_memory_gb)
