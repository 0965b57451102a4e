"""The shape of one training step: everything the memory model, the fake-tensor trace and `--measure` need
besides the micro-batch. Torch-free; the planner builds one per plan from the run configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

from telepathy.bridge_shape import source_layer
from telepathy.config import ATTENTIONS, BridgeConfig, DataConfig, RunConfig, TrainConfig, check_backend
from telepathy.errors import UserError
from telepathy.registry import Pair

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
