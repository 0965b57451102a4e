"""Typed, validated run configuration: what the launcher resolves and every worker reads.

Torch-free. One dataclass per concern; defaults live here and nowhere else. A RunConfig is written to
the run folder as `config.json` at submission and read back by the worker (`RunConfig.load`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from telepathy.errors import UserError
from telepathy.files import atomic_write_text
from telepathy.rundir import RunDir

BACKENDS = ("ddp", "fsdp", "deepspeed")
# "auto": FlashAttention-2 where its extension works on the run's GPU, else PyTorch SDPA (loading.py).
ATTENTIONS = ("auto", "sdpa", "flash_attention_2", "eager")
# Compute precision: frozen models and the bridge's forward/backward (the bridge's master weights, gradients
# and AdamW state are always fp32). "auto": bf16 where the hardware runs it natively, else fp32.
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Method:
    """One row of a results table: what it trains, whether its result depends on the seed, and what it is."""

    name: str
    trains: bool  # fitted on the train split (its own run folder, checkpoints); else evaluation only
    seeded: bool  # the seed changes its result; deterministic methods run once per pair and task
    what: str


# The one table of method names: a recipe, `--method` and `--baselines` name these (telepathy/evaluate.py,
# telepathy/train.py implement them).
METHODS = {
    m.name: m
    for m in (
        Method(
            "bridge", True, True, "sender states at the tapped layer -> trained bridge -> K soft tokens -> receiver"
        ),
        Method("prompt_tuning", True, True, "K trained soft tokens after the task prompt, on the receiver alone"),
        Method("lora", True, True, "LoRA (PEFT, rank 8, q/v projections) on the receiver reading the task prompt"),
        Method("linear_probe", True, False, "logistic regression on mean-pooled sender states at the tapped layer"),
        Method("receiver", False, False, "the receiver with the primer only: never sees the text (the floor)"),
        Method("receiver_zero_shot", False, False, "the receiver reads the text with the task prompt"),
        Method("sender_zero_shot", False, False, "the full sender reads the text with the task prompt"),
        Method("receiver_k_shot", False, True, "the receiver reads k balanced labelled examples, then the text"),
        Method("text_relay", False, False, "the sender writes a summary, the receiver reads it with the task prompt"),
    )
}
TRAINED = tuple(m for m, spec in METHODS.items() if spec.trains)
# Evaluation-only methods: a run's own method, or evaluated beside it (`eval.baselines`) on the same examples.
BASELINES = tuple(m for m, spec in METHODS.items() if not spec.trains)
# Methods that need the full sender causal LM (its later layers and LM head) at evaluation.
FULL_SENDER = ("sender_zero_shot", "text_relay")


def check_backend(backend: str, *, single_model: bool = False, world_size: int = 2) -> None:
    """The one validation of a backend choice, for the planner, the memory model and the worker alike."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
    if backend == "fsdp" and single_model and world_size > 1:
        raise UserError(
            "backend fsdp cannot shard a single-model pair (sender and receiver share weights); "
            "use --backend ddp or deepspeed"
        )


@dataclass(frozen=True)
class BridgeConfig:
    soft_tokens: int = 32  # K learned queries = soft tokens handed to the receiver
    depth: int = 2  # Perceiver blocks (cross-attn, self-attn, MLP)
    heads: int | None = None  # attention heads; None: the receiver width / head_dim
    head_dim: int = 128  # per-head width when heads is None (flash and cuDNN attention take up to 128-256)
    mlp_ratio: int = 4
    # Which sender hidden state feeds the bridge, as in HF's `hidden_states[i]` (0 = embeddings).
    # None = layers - 1, the original's `hidden_states[31]` of a 32-layer sender.
    source_layer: int | None = None
    diversity_weight: float = 0.1  # batch-diversity penalty of the original (mean off-diagonal cosine)

    def heads_for(self, width: int) -> int:
        """The heads at a receiver width: as given, else width / head_dim (the largest divisor of the width at
        most that, so heads always divide it). The original's fixed 8 meant head_dim 512 on 4096-wide
        receivers, beyond what flash and cuDNN attention take."""
        if self.heads is not None:
            return self.heads
        target = max(1, width // self.head_dim)
        return max(h for h in range(1, target + 1) if width % h == 0)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500  # optimizer steps
    micro_batch: int = 16  # per GPU per micro-step (the planner sets this)
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 42
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    length_grouped: bool = True  # batches of similar sender length (deterministic, resume-safe)
    activation_checkpointing: bool = False  # receiver layers, for long receiver sequences
    sender_cache: bool = False  # read tapped-layer states from the shared sender cache
    zero_stage: int = 2  # DeepSpeed only: 2 or 3
    precision: str = "auto"  # compute dtype (one of PRECISIONS); the bridge trains fp32 master weights under autocast
    attention: str = "auto"  # frozen models' attention kernel (one of ATTENTIONS)


@dataclass(frozen=True)
class DataConfig:
    task: str = "sst2"  # a name in configs/tasks/ or a path to a .jsonl/.csv file ("demo" ships in the repo)
    max_length: int = 128  # sender tokens (truncation)
    answer_length: int = 16  # receiver answer tokens, padded per batch
    eval_samples: int | None = 200  # None = the whole eval split
    train_samples: int | None = None


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = 10
    baselines: tuple[str, ...] = ("receiver", "sender_zero_shot", "text_relay")
    relay_tokens: int = 50  # what the sender writes for the text-relay baseline
    latency_samples: int = 20
    batch_size: int = 16
    k_shot: int = 5  # labelled examples in receiver_k_shot's prompt, balanced over the classes, seeded


@dataclass(frozen=True)
class RunConfig:
    sender: str  # registry alias, hub id or local path
    receiver: str
    run_dir: str
    backend: str = "ddp"
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "run"
    predicted_peak_gib: float | None = None  # the planner's memory estimate, logged beside measurements
    method: str = "bridge"  # what this run trains or evaluates (a name in METHODS)

    def __post_init__(self):
        check_backend(self.backend)
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}'; use one of {', '.join(METHODS)}")
        if self.method != "bridge" and self.backend != "ddp":
            raise UserError(
                f"method {self.method} runs on the ddp backend only (what it trains is small and its model fits "
                f"one GPU); drop --backend {self.backend}"
            )
        if self.method != "bridge" and self.train.sender_cache:
            raise UserError(f"train.sender_cache feeds the bridge only; turn it off for method {self.method}")
        t = self.train
        for k in ("steps", "micro_batch", "grad_accum", "keep_checkpoints", "checkpoint_every", "log_every"):
            if getattr(t, k) < 1:
                raise UserError(f"train.{k} must be >= 1 (got {getattr(t, k)})")
        if t.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)} (got {t.precision})")
        if t.attention not in ATTENTIONS:
            raise UserError(f"train.attention must be one of {', '.join(ATTENTIONS)} (got {t.attention})")
        if t.zero_stage not in (2, 3):
            raise UserError(f"train.zero_stage must be 2 or 3 (got {t.zero_stage})")
        b = self.bridge
        if b.soft_tokens < 1 or b.depth < 1 or (b.heads is not None and b.heads < 1) or b.head_dim < 1:
            raise UserError("bridge soft_tokens, depth, heads and head_dim must be >= 1")
        d = self.data
        if d.max_length < 1 or d.answer_length < 1:
            raise UserError(
                f"data.max_length and data.answer_length must be >= 1 (got {d.max_length}, {d.answer_length})"
            )
        for k in ("eval_samples", "train_samples"):
            if getattr(d, k) is not None and getattr(d, k) < 1:
                raise UserError(f"data.{k} must be >= 1 or null for all (got {getattr(d, k)})")
        e = self.eval
        unknown = [m for m in e.baselines if m not in BASELINES]
        if unknown:
            raise UserError(f"unknown baseline '{unknown[0]}'; use any of {', '.join(BASELINES)} (comma-separated)")
        for k in ("max_new_tokens", "relay_tokens", "batch_size", "k_shot"):
            if getattr(e, k) < 1:
                raise UserError(f"eval.{k} must be >= 1 (got {getattr(e, k)})")
        if e.latency_samples < 0:
            raise UserError(f"eval.latency_samples must be >= 0 (got {e.latency_samples})")

    @property
    def dir(self) -> RunDir:
        return RunDir(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        try:
            for key, sub in (
                ("bridge", BridgeConfig),
                ("train", TrainConfig),
                ("data", DataConfig),
                ("eval", EvalConfig),
            ):
                v = dict(d.get(key) or {})
                if key == "eval" and "baselines" in v:
                    v["baselines"] = tuple(v["baselines"])
                d[key] = sub(**v)
            return cls(**d)
        except TypeError as e:
            raise UserError(f"bad run config: {e}; check the field names") from None

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some fields of sections changed: cfg.replace(train={"steps": 5})."""
        top = {k: v for k, v in sections.items() if not isinstance(v, dict)}
        nested = {k: dataclasses.replace(getattr(self, k), **v) for k, v in sections.items() if isinstance(v, dict)}
        return dataclasses.replace(self, **top, **nested)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise UserError(f"run config {path} not found") from None
        except json.JSONDecodeError as e:
            raise UserError(f"run config {path} is not valid JSON (line {e.lineno})") from None
