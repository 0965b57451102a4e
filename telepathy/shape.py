"""The shape of one training step: everything the memory model, the fake-tensor trace and `--measure` need
besides the micro-batch. Torch-free; the planner builds one per plan from the run configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from telepathy.bridge_shape import source_layer
from telepathy.config import ATTENTIONS, BridgeConfig, DataConfig, RunConfig, TrainConfig, check_backend
from telepathy.errors import UserError
from telepathy.registry import ModelSpec, Pair

# The receiver primer's length in tokens ("Sentiment:" and the other task primers are 3-4 tokens).
PRIMER_LEN = 4
# Attention kernels the memory model knows; "auto" plans as SDPA (FlashAttention-2, when the worker finds it
# working, saves less: the estimate stays on the safe side).
KERNELS = tuple(a for a in ATTENTIONS if a != "auto")


@dataclass(frozen=True)
class StepShape:
    pair: Pair
    bridge: BridgeConfig = BridgeConfig()
    backend: str = "ddp"
    world_size: int = 1
    seq_len: int = DataConfig.max_length  # sender tokens
    answer_len: int = DataConfig.answer_length
    primer_len: int = PRIMER_LEN
    zero_stage: int = TrainConfig.zero_stage
    attention: str = "sdpa"  # the kernel the GPU run uses (one of KERNELS)
    activation_checkpointing: bool = False
    answer_only_logits: bool = True  # the LM head runs on answer-predicting positions only (step.py)
    compute_dtype: str = "bf16"  # frozen weights and the bridge's autocast ("bf16" or "fp32"; "auto" plans as bf16)
    sender_cache: bool = False  # batches carry cached sender states: no sender is built or run

    def __post_init__(self) -> None:
        check_backend(self.backend, single_model=self.pair.single, world_size=self.world_size)
        if self.attention not in KERNELS:
            raise UserError(f"unknown attention '{self.attention}'; use one of {', '.join(KERNELS)}")
        if self.compute_dtype not in ("bf16", "fp32"):
            raise UserError(f"compute dtype must be bf16 or fp32 (got {self.compute_dtype})")
        if self.world_size < 1 or self.seq_len < 1 or self.answer_len < 1 or self.primer_len < 0:
            raise UserError("world size, sequence length and answer length must be >= 1 (primer length >= 0)")
        if self.zero_stage not in (2, 3):
            raise UserError(f"zero_stage must be 2 or 3 (got {self.zero_stage})")
        source_layer(self.bridge, self.pair.sender)

    @classmethod
    def of(cls, run: RunConfig, pair: Pair, world_size: int, **changes) -> StepShape:
        """The step `run` trains on `world_size` GPUs (attention "auto" is planned as SDPA, precision "auto" as
        bf16: what GPUs run)."""
        t = run.train
        fields = dict(
            pair=pair,
            bridge=run.bridge,
            backend=run.backend,
            world_size=world_size,
            seq_len=run.data.max_length,
            answer_len=run.data.answer_length,
            zero_stage=t.zero_stage,
            attention="sdpa" if t.attention == "auto" else t.attention,
            activation_checkpointing=t.activation_checkpointing,
            compute_dtype="fp32" if t.precision == "fp32" else "bf16",
            sender_cache=t.sender_cache,
        )
        if run.method in ("prompt_tuning", "lora"):
            # No sender; the receiver reads the task prompt (max_length tokens) instead of the primer. Planned
            # as a bridge step without sender over that prompt: the bridge's own terms over-estimate what a
            # soft prompt or LoRA adapters hold, so the micro-batch stays on the safe side.
            fields.update(sender_cache=True, primer_len=run.data.max_length + PRIMER_LEN)
        return cls(**{**fields, **changes})

    def replace(self, **changes) -> StepShape:
        return StepShape(**{**self.__dict__, **changes})

    def run_config(self, micro_batch: int) -> RunConfig:
        """A run configuration that builds exactly this step (for the trace and --measure; never written)."""
        train = TrainConfig(
            micro_batch=max(1, micro_batch),
            activation_checkpointing=self.activation_checkpointing,
            precision=self.compute_dtype,
            sender_cache=self.sender_cache,
            zero_stage=self.zero_stage,
            attention=self.attention,
        )
        return RunConfig(
            sender=self.pair.sender.alias,
            receiver=self.pair.receiver.alias,
            run_dir="(not written)",
            backend=self.backend,
            bridge=self.bridge,
            train=train,
            data=DataConfig(max_length=self.seq_len, answer_length=self.answer_len),
        )

    # ---- derived sizes
    @property
    def tapped_layers(self) -> int:
        """Decoder layers the sender runs: `hidden_states[i]` needs layers 0..i-1."""
        return source_layer(self.bridge, self.pair.sender)

    @property
    def receiver_tokens(self) -> int:
        return self.primer_len + self.bridge.soft_tokens + self.answer_len

    @property
    def logit_rows(self) -> int:
        return self.answer_len if self.answer_only_logits else self.receiver_tokens

    def to_dict(self) -> dict:
        """The knobs as plain data (the plan's memory record shows them)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("pair", "bridge")}
        return {"pair": self.pair.name, "bridge": dict(self.bridge.__dict__), **d}


# ---------------------------------------------------------------------------------------------- FLOPs
# Counted in closed form from the shapes (2 FLOPs per multiply-add), as torch's FlopCounterMode counts the
# matrix products of the same computation (tests/test_flops.py): the dry run turns them into GPU-hours.
# Token counts are their caps (data.max_length, data.answer_length): estimates are upper bounds.


def _decoder_parts(
    spec: ModelSpec, tokens: int, context: int, layers: int | None, head_tokens: int, causal: bool
) -> tuple[float, float, float]:
    """(linear layers, attention scores and values, LM head) FLOPs of one forward."""
    h, q, kv = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    n = spec.layers if layers is None else layers
    linear = n * 2 * tokens * (h * q + 2 * h * kv + q * h + 3 * h * spec.intermediate)
    keys = tokens * context + (tokens * (tokens + 1) / 2 if causal else tokens * tokens)
    return linear, n * 2 * 2 * keys * q, 2 * head_tokens * h * spec.vocab


def decoder_flops(
    spec: ModelSpec,
    tokens: int,
    *,
    context: int = 0,
    layers: int | None = None,
    head_tokens: int = 0,
    causal: bool = True,
) -> float:
    """One forward of `tokens` new tokens through `layers` decoder layers (default all) after `context`
    cached ones, the LM head on `head_tokens` of them. Attention scores and values: causal (each token
    attends to the context and the tokens before it), or the full square a masked SDPA call computes."""
    return sum(_decoder_parts(spec, tokens, context, layers, head_tokens, causal))


def frozen_train_flops(spec: ModelSpec, tokens: int, head_tokens: int) -> float:
    """Forward and backward of a frozen model that gradients flow through (to a trained input or adapter):
    backward computes input gradients only, one product per linear layer and the head, two per attention
    product: 2 x forward + attention."""
    linear, attention, head = _decoder_parts(spec, tokens, 0, None, head_tokens, True)
    return 2 * (linear + attention + head) + attention


def bridge_flops(bridge: BridgeConfig, src_dim: int, dim: int, seq: int) -> float:
    """One forward of the bridge (telepathy/bridge.py) for one sample over `seq` sender tokens."""
    k, r = bridge.soft_tokens, bridge.mlp_ratio
    proj = 2 * seq * src_dim * dim * (src_dim != dim)
    cross = 2 * (k * dim * dim + 2 * seq * dim * dim + k * dim * dim) + 2 * 2 * k * seq * dim
    self_attn = 2 * 4 * k * dim * dim + 2 * 2 * k * k * dim
    mlp = 2 * 2 * r * k * dim * dim
    return proj + bridge.depth * (cross + self_attn + mlp)


def generation_flops(spec: ModelSpec, prefix: int, new_tokens: int) -> tuple[float, float]:
    """(prefill, decode) FLOPs of greedy generation: the prefix in one forward (LM head on its last token),
    then one forward per further token."""
    prefill = decoder_flops(spec, prefix, head_tokens=1)
    steps = max(0, new_tokens - 1)
    # decode step i attends to prefix + i + 1 keys; summed in closed form
    h, q, kv = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    linear = spec.layers * 2 * (h * q + 2 * h * kv + q * h + 3 * h * spec.intermediate) + 2 * h * spec.vocab
    keys = steps * (prefix + 1) + steps * (steps - 1) / 2
    return prefill, steps * linear + spec.layers * 2 * 2 * q * keys


def scoring_flops(spec: ModelSpec, prefix: int, labels: int, label_tokens: int) -> float:
    """Label scoring: `labels` rows of prefix + label tokens, the LM head on the label tokens."""
    return labels * decoder_flops(spec, prefix + label_tokens, head_tokens=label_tokens)


def run_flops(run: RunConfig, pair: Pair, global_batch: int, n_train: int, n_eval: int, n_labels: int) -> dict:
    """{"dense": FLOPs of whole-sequence passes, "decode": FLOPs of token-by-token generation} of one run: its
    training (steps x global batch samples, or the probe's feature pass over both splits) and the evaluation
    of its method and baselines on n_eval examples (generation and label scoring). Dense passes and decoding
    run at very different utilisation, so the dry run prices them apart."""
    S, R = pair.sender, pair.receiver
    tap = source_layer(run.bridge, S)
    seq, answer, k, e = run.data.max_length, run.data.answer_length, run.bridge.soft_tokens, run.eval
    dense = decode = 0.0
    body = decoder_flops(S, seq, layers=tap)
    bridge = bridge_flops(run.bridge, S.hidden, R.hidden, seq)
    if run.method == "bridge":  # sender body forward, bridge forward + backward, the receiver between
        dense += (
            run.train.steps
            * global_batch
            * (body + 3 * bridge + frozen_train_flops(R, PRIMER_LEN + k + answer, answer))
        )
    elif run.method in ("prompt_tuning", "lora"):  # the LoRA matrices' own products are negligible
        tokens = seq + (k if run.method == "prompt_tuning" else 0) + answer
        dense += run.train.steps * global_batch * frozen_train_flops(R, tokens, answer)
    elif run.method == "linear_probe":
        dense += (n_train + n_eval) * body
    for m in [run.method] + [b for b in e.baselines if b != run.method]:
        if m == "linear_probe":
            continue
        lm, prefix, n = R, seq, n_eval
        if m == "bridge":
            dense += n_eval * (body + bridge)
            prefix = PRIMER_LEN + k
        elif m == "prompt_tuning":
            prefix = seq + k
        elif m == "receiver":  # the same input for every example: once
            prefix, n = PRIMER_LEN, 1
        elif m == "sender_zero_shot":
            lm = S
        elif m == "receiver_k_shot":
            prefix = (e.k_shot + 1) * seq
        elif m == "text_relay":
            pre, dec = generation_flops(S, seq, e.relay_tokens)
            dense, decode = dense + n_eval * pre, decode + n_eval * dec
            prefix = seq + e.relay_tokens  # the reader: the summary inside the task prompt
        pre, dec = generation_flops(lm, prefix, e.max_new_tokens)
        dense += n * (pre + scoring_flops(lm, prefix, n_labels, answer))
        decode += n * dec
    return {"dense": dense, "decode": decode}
