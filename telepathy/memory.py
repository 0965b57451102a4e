"""Analytic per-GPU memory of one training step, by component, in closed form. Torch-free.

The planner calls this for every plan (each --dry-run, each task of a sweep), so it imports nothing heavy.
Every term counts the bytes of tensors the step (telepathy/step.py) holds; the fake-tensor trace of that
same step (telepathy/trace.py) checks the sum (tests/test_memory_calibration.py: within 5 %).

Peak = what lives through the whole step (weights, optimizer state) + the largest of three phases:
  sender    the frozen, truncated sender's no-grad forward: one layer's transients over b x seq_len tokens;
  receiver  bridge + receiver forward and backward: tensors saved for backward, plus backward transients;
  optimizer the bridge's gradients and AdamW's foreach temporaries.
Each phase is linear in the micro-batch, so the largest micro-batch that fits is closed form.

Sequence lengths: `seq_len` is the sender's input tokens; the receiver reads primer + K soft tokens + answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from telepathy.bridge_shape import bridge_param_count
from telepathy.config import BACKENDS, BridgeConfig
from telepathy.errors import UserError
from telepathy.registry import ModelSpec, Pair

GIB = 2**30
BF16, FP32, INT64 = 2, 4, 8
ATTENTIONS = ("sdpa", "flash_attention_2", "eager")

# The one definition of usable GPU memory. Profiles give GPU memory in GB (decimal, as sold: "80 GB");
# the estimate is in GiB. Held back: the CUDA context, NCCL and cuBLAS workspaces (fixed) and allocator
# fragmentation (a share of the card). Neither is visible to the tracer nor to this model.
CONTEXT_RESERVE_GIB = 3.0
FRAGMENTATION_SHARE = 0.05

COMPONENTS = ("frozen_weights", "bridge_params", "gradients", "optimizer", "activations", "temporaries",
              "comm_buffers")


def gpu_gib(gpu_memory_gb: float) -> float:
    return gpu_memory_gb * 1e9 / GIB


def safety_margin_gib(gpu_memory_gb: float) -> float:
    """GiB kept free on a GPU of `gpu_memory_gb` GB: the context reserve plus the fragmentation share."""
    return CONTEXT_RESERVE_GIB + FRAGMENTATION_SHARE * gpu_gib(gpu_memory_gb)


def usable_gib(gpu_memory_gb: float, safety_margin: float | None = None) -> float:
    return gpu_gib(gpu_memory_gb) - (safety_margin_gib(gpu_memory_gb) if safety_margin is None else safety_margin)


def margin_text(gpu_memory_gb: float) -> str:
    """How the margin was computed, for CLI output."""
    return (f"{gpu_memory_gb:g} GB = {gpu_gib(gpu_memory_gb):.1f} GiB, minus {CONTEXT_RESERVE_GIB:g} GiB (CUDA context, "
            f"NCCL/cuBLAS workspaces) and {FRAGMENTATION_SHARE:.0%} (allocator fragmentation) = "
            f"{usable_gib(gpu_memory_gb):.1f} GiB usable")


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU peak of one training step; components in GiB at the peak phase."""

    components: dict[str, float]
    phase: str  # which phase sets the peak: "sender", "receiver" or "optimizer"
    phases: dict[str, float]  # each phase's own peak (GiB)
    knobs: dict = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return sum(self.components.values())

    def to_dict(self) -> dict:
        return {"total_gib": round(self.total_gib, 3), "phase": self.phase,
                "components": {k: round(v, 3) for k, v in self.components.items()},
                "phases": {k: round(v, 3) for k, v in self.phases.items()}, "knobs": dict(self.knobs)}


@dataclass(frozen=True)
class Line:
    """One phase's peak as fixed + per_sample * micro_batch (GiB)."""

    phase: str
    fixed_gib: float
    per_sample_gib: float

    def at(self, micro_batch: int) -> float:
        return self.fixed_gib + self.per_sample_gib * micro_batch


# ---------------------------------------------------------------------------------------------- shapes


def tapped_layers(sender: ModelSpec, bridge: BridgeConfig) -> int:
    """Decoder layers the sender runs: `hidden_states[i]` needs layers 0..i-1 (None = layers - 1)."""
    n = sender.layers - 1 if bridge.source_layer is None else bridge.source_layer
    if not 0 <= n <= sender.layers:
        raise UserError(f"bridge.source_layer {bridge.source_layer} is outside 0..{sender.layers} for {sender.alias}; "
                        f"pick a layer of the sender")
    return n


def frozen_param_counts(pair: Pair, bridge: BridgeConfig) -> dict[str, int]:
    """Frozen parameters that are built: the sender body up to the tap (embeddings + tapped layers, no
    LM head; the final norm only when every layer runs) and the whole receiver. A single-model pair holds
    its weights once."""
    r = pair.receiver.param_counts()
    if pair.single:
        return {"sender": 0, "receiver": r["total"]}
    s = pair.sender.param_counts()
    n = tapped_layers(pair.sender, bridge)
    sender = s["embed"] + n * s["layer"] + (s["norm"] if n == pair.sender.layers else 0)
    return {"sender": sender, "receiver": r["total"]}


def bridge_params(pair: Pair, bridge: BridgeConfig) -> int:
    return bridge_param_count(bridge, pair.sender.hidden, pair.receiver.hidden)


def _kv(spec: ModelSpec) -> int:
    return spec.kv_heads * spec.head_dim


def _q(spec: ModelSpec) -> int:
    return spec.heads * spec.head_dim


# --------------------------------------------------------------------------------------- per-phase bytes


@dataclass(frozen=True)
class _Step:
    """Everything the byte counts need, resolved once."""

    pair: Pair
    bridge: BridgeConfig
    backend: str
    world: int
    seq: int  # sender tokens
    answer: int
    primer: int
    zero_stage: int
    attention: str
    ckpt: bool
    answer_only: bool
    bridge_dtype: str

    @property
    def tapped(self) -> int:
        return tapped_layers(self.pair.sender, self.bridge)

    @property
    def bridge_bytes(self) -> int:
        return FP32 if self.bridge_dtype == "float32" else BF16

    @property
    def recv_tokens(self) -> int:
        return self.primer + self.bridge.soft_tokens + self.answer

    @property
    def logit_rows(self) -> int:
        return self.answer if self.answer_only else self.recv_tokens


def _attn_saved_per_token(spec: ModelSpec, attention: str, tokens: int) -> float:
    """Bytes one attention call saves for backward per query token. SDPA with a padding mask: HF repeats
    k and v to every query head (transformers' sdpa_attention_forward), and the kernel saves q, k, v, the
    output, its fp32 log-sum-exp and the boolean mask converted to the compute dtype. FlashAttention-2
    keeps k and v at their kv-head width and needs no mask. Eager saves the fp32 softmax and its bf16 copy."""
    q, kv, heads = _q(spec), _kv(spec), spec.heads
    if attention == "flash_attention_2":
        return BF16 * (2 * q + 2 * kv) + FP32 * heads
    if attention == "eager":
        return BF16 * 3 * q + heads * tokens * (FP32 + BF16) + BF16 * tokens
    return BF16 * 4 * q + FP32 * heads + BF16 * tokens


def _receiver_layer_saved(spec: ModelSpec, attention: str, tokens: int) -> float:
    """Bytes one receiver decoder layer saves for backward per sample. The weights are frozen, so no Linear
    saves its input (only the weight gradient would need it); what remains is each RMSNorm's fp32 input,
    the attention kernel's tensors and SwiGLU's gate, silu(gate) and up."""
    per_token = 2 * FP32 * spec.hidden + _attn_saved_per_token(spec, attention, tokens) + 3 * BF16 * spec.intermediate
    return tokens * per_token


def _sender_peak_per_sample(st: _Step) -> float:
    """Peak bytes of the sender's no-grad forward per sample, at the MLP of a layer after the first: the
    embedding output (HF keeps it), the layer input, the post-attention residual and the normed input
    (hidden-size, bf16), plus silu(gate), up and their product (intermediate-size); the (s x s) boolean
    padding mask lives through the whole forward (not built for FlashAttention-2)."""
    spec, s, n = st.pair.sender, st.seq, st.tapped
    if n == 0:
        return s * BF16 * spec.hidden
    hidden_tensors = 4 if n >= 2 else 3  # in the first layer the layer input is the embedding output
    mlp = BF16 * (hidden_tensors * spec.hidden + 3 * spec.intermediate)
    attn = BF16 * (3 * spec.hidden + 6 * _q(spec) + 2 * _kv(spec))  # q, repeated k and v, output, rotary temps
    mask = 0 if st.attention == "flash_attention_2" else s  # bool, one byte per query-key pair
    if st.attention == "eager":
        attn += spec.heads * s * (FP32 + BF16)
    elif st.attention == "sdpa":
        attn += BF16 * s  # the mask converted to bf16 for the kernel
    return s * (max(mlp, attn) + mask)


def _bridge_saved(st: _Step) -> float:
    """Bytes the bridge saves per sample. Over the sender tokens: the input projection's input (when the
    widths differ) and, per block, the cross-attention's contiguous copy of the keys (nn.MultiheadAttention
    runs sequence-first, so the batch-first keys are copied for the k/v projection, which saves the copy)
    and its packed k/v output, plus the per-head padding mask. Over the K latents, per block: packed q/k/v,
    the MLP's hidden and GELU output (r widths each), and 12 more widths of LayerNorm inputs and outputs,
    attention inputs and outputs and residuals; then the output RMS-norm's fp32 tensors."""
    b = st.bridge
    d, d_s, s, e = st.pair.receiver.hidden, st.pair.sender.hidden, st.seq, st.bridge_bytes
    over_seq = s * (e * d_s * (d_s != d) + b.depth * (e * 3 * d + e * b.heads))
    over_latents = b.soft_tokens * (e * d * (b.depth * (12 + 2 * b.mlp_ratio) - 1) + 2 * FP32 * d)
    return over_seq + over_latents


def _per_sample(st: _Step) -> dict[str, dict[str, float]]:
    """Per-sample bytes by phase and component."""
    R = st.pair.receiver
    t, n = st.recv_tokens, st.logit_rows
    # The batch itself (int64 ids and masks) lives through the whole step.
    inputs = INT64 * (2 * st.seq + st.primer + 2 * st.answer)
    if st.ckpt:  # each layer keeps its input; backward recomputes one layer at a time
        layers_saved = R.layers * t * BF16 * R.hidden + _receiver_layer_saved(R, st.attention, t)
    else:
        layers_saved = R.layers * _receiver_layer_saved(R, st.attention, t)
    recv_saved = _bridge_saved(st) + layers_saved + t * FP32 * R.hidden + n * FP32 * R.vocab
    # Backward starts with the loss: the gradient of the fp32 log-softmax and of the logits exist together
    # while log-softmax's output is still saved; the soft tokens' gradient from the diversity term waits.
    recv_tmp = n * 2 * FP32 * R.vocab + st.bridge.soft_tokens * R.hidden * BF16
    return {
        "sender": {"activations": inputs + _sender_peak_per_sample(st)},
        "receiver": {"activations": inputs + recv_saved, "temporaries": recv_tmp},
        "optimizer": {"activations": inputs},
    }


def _fixed(st: _Step) -> dict[str, dict[str, float]]:
    """Batch-independent bytes by phase and component, per GPU for the backend."""
    frozen = sum(frozen_param_counts(st.pair, st.bridge).values())
    p = bridge_params(st.pair, st.bridge)
    w = st.world
    e = st.bridge_bytes
    # The bridge trains in train.bridge_dtype: parameters, gradients and both AdamW moments in that dtype.
    resident = {"frozen_weights": BF16 * frozen, "bridge_params": e * p, "optimizer": 2 * e * p}
    grads = e * p
    foreach_tmp = e * p  # AdamW(foreach=True), the CUDA default, builds one temporary list as large as the parameters
    comm = 0.0
    if st.backend == "fsdp":
        # Frozen models and bridge sharded over the world; each rank holds the unsharded parameters of the
        # unit it runs plus the prefetched next one (decoder layers are the units).
        resident = {k: v / w for k, v in resident.items()}
        grads, foreach_tmp = grads / w, foreach_tmp / w
        comm = 2 * BF16 * max(st.pair.sender.param_counts()["layer"], st.pair.receiver.param_counts()["layer"])
        comm = comm if w > 1 else 0.0
    elif st.backend == "deepspeed":
        # Only the bridge is the DeepSpeed engine: frozen models stay replicated. ZeRO keeps fp32 master
        # weights and fp32 Adam moments (12 B/param) sharded over the world; stage 2 shards the gradients
        # too, stage 3 also the bf16 parameters.
        resident["optimizer"] = 3 * FP32 * p / w
        grads = grads / w
        foreach_tmp = FP32 * p / w
        if st.zero_stage == 3:
            resident["bridge_params"] = e * p / w
    return {
        "sender": {**resident, "comm_buffers": comm},
        "receiver": {**resident, "comm_buffers": comm},
        "optimizer": {**resident, "gradients": grads, "temporaries": foreach_tmp},
    }


def _resolve(pair: Pair, *, backend: str, world_size: int, seq_len: int, answer_len: int, primer_len: int,
             bridge: BridgeConfig, zero_stage: int, attention: str, activation_checkpointing: bool,
             answer_only_logits: bool, bridge_dtype: str) -> _Step:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
    if attention not in ATTENTIONS:
        raise UserError(f"unknown attention '{attention}'; use one of {', '.join(ATTENTIONS)}")
    if bridge_dtype not in ("bfloat16", "float32"):
        raise UserError(f"bridge dtype must be bfloat16 or float32 (got {bridge_dtype})")
    if world_size < 1 or seq_len < 1 or answer_len < 1 or primer_len < 0:
        raise UserError("world size, sequence length and answer length must be >= 1 (primer length >= 0)")
    if zero_stage not in (2, 3):
        raise UserError(f"zero_stage must be 2 or 3 (got {zero_stage})")
    tapped_layers(pair.sender, bridge)
    return _Step(pair, bridge, backend, world_size, seq_len, answer_len, primer_len, zero_stage, attention,
                 activation_checkpointing, answer_only_logits, bridge_dtype)


def _by_phase(st: _Step, micro_batch: int) -> dict[str, dict[str, float]]:
    """GiB by phase and component at `micro_batch`."""
    fixed, per = _fixed(st), _per_sample(st)
    out = {}
    for phase in fixed:
        comp = dict.fromkeys(COMPONENTS, 0.0)
        for c, v in fixed[phase].items():
            comp[c] += v / GIB
        for c, v in per[phase].items():
            comp[c] += micro_batch * v / GIB
        out[phase] = comp
    return out


# -------------------------------------------------------------------------------------------- public API


def estimate(pair: Pair, *, micro_batch: int, seq_len: int, backend: str = "ddp", world_size: int = 1,
             answer_len: int = 16, primer_len: int = 4, bridge: BridgeConfig = BridgeConfig(), zero_stage: int = 2,
             attention: str = "sdpa", activation_checkpointing: bool = False, answer_only_logits: bool = True,
             bridge_dtype: str = "bfloat16") -> MemoryEstimate:
    """Per-GPU peak memory of one training step: GiB by component at the phase that sets the peak.

    seq_len: sender input tokens; the receiver reads primer_len + bridge.soft_tokens + answer_len.
    attention: the kernel the GPU run uses (sdpa, flash_attention_2 or eager). bridge_dtype: the bridge's
    parameters, gradients and AdamW state (train.bridge_dtype)."""
    if micro_batch < 0:
        raise UserError(f"micro-batch must be >= 0 (got {micro_batch})")
    knobs = dict(seq_len=seq_len, backend=backend, world_size=world_size, answer_len=answer_len,
                 primer_len=primer_len, zero_stage=zero_stage, attention=attention,
                 activation_checkpointing=activation_checkpointing, answer_only_logits=answer_only_logits,
                 bridge_dtype=bridge_dtype)
    phases = _by_phase(_resolve(pair, bridge=bridge, **knobs), micro_batch)
    peak = max(phases, key=lambda p: sum(phases[p].values()))
    return MemoryEstimate(phases[peak], peak, {ph: sum(c.values()) for ph, c in phases.items()},
                          {"micro_batch": micro_batch, **knobs})


def peak_lines(pair: Pair, **knobs) -> list[Line]:
    """Each phase's peak as fixed + per-sample GiB (`estimate`'s knobs, without micro_batch)."""
    zero, one = estimate(pair, micro_batch=0, **knobs).phases, estimate(pair, micro_batch=1, **knobs).phases
    return [Line(p, zero[p], one[p] - zero[p]) for p in zero]


def max_micro_batch(pair: Pair, *, gpu_memory_gb: float, safety_margin_gib: float | None = None, **knobs) -> int:
    """The largest micro-batch whose estimate fits the usable memory (`usable_gib`); 0 if none does."""
    budget = usable_gib(gpu_memory_gb, safety_margin_gib)
    lines = peak_lines(pair, **knobs)
    if any(line.fixed_gib > budget for line in lines):
        return 0
    n = min(int((budget - line.fixed_gib) / line.per_sample_gib) for line in lines if line.per_sample_gib > 0)
    while n > 0 and max(line.at(n) for line in lines) > budget:  # float rounding at the boundary
        n -= 1
    return n


def weights_fit(pair: Pair, *, backend: str, world_size: int, gpu_memory_gb: float,
                bridge: BridgeConfig = BridgeConfig()) -> bool:
    """False when the frozen weights alone (per GPU under `backend`) exceed the usable memory."""
    est = estimate(pair, micro_batch=0, seq_len=1, backend=backend, world_size=world_size, bridge=bridge)
    return est.components["frozen_weights"] <= usable_gib(gpu_memory_gb)
