"""The one flag table: every flag that sets a RunConfig field, shared by `launch`, `launch memory` and
`--sweep` keys, and the typed request the planner takes instead of an argparse namespace.

A flag's parser is also the sweep value's parser, so `--sweep lr=abc` and `--lr abc` fail the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from launcher.profiles import add_profile_flags, profile_overrides
from telepathy.config import ATTENTIONS, BACKENDS, METHODS, PRECISIONS


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"'{text}' is not one of {', '.join(options)}")
        return text

    parse.__name__ = "choice"
    return parse


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list ("receiver,sender"); empty for "" (no baselines)."""
    return tuple(b.strip() for b in text.split(",") if b.strip())


# flag -> (RunConfig section, field, parser). One table: `launch`, `launch memory`, --sweep keys and recipe
# settings. Section "" is a top-level RunConfig field.
RUN_FLAGS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "method": ("", "method", choice(*METHODS)),
    "task": ("data", "task", str),
    "max-length": ("data", "max_length", positive_int),
    "answer-length": ("data", "answer_length", positive_int),
    "eval-samples": ("data", "eval_samples", positive_int),
    "train-samples": ("data", "train_samples", positive_int),
    "steps": ("train", "steps", positive_int),
    "lr": ("train", "lr", positive_float),
    "weight-decay": ("train", "weight_decay", non_negative_float),
    "seed": ("train", "seed", int),
    "warmup-steps": ("train", "warmup_steps", non_negative_int),
    "checkpoint-every": ("train", "checkpoint_every", positive_int),
    "zero-stage": ("train", "zero_stage", int),
    "precision": ("train", "precision", choice(*PRECISIONS)),
    "attention": ("train", "attention", choice(*ATTENTIONS)),
    "soft-tokens": ("bridge", "soft_tokens", positive_int),
    "depth": ("bridge", "depth", positive_int),
    "heads": ("bridge", "heads", positive_int),
    "head-dim": ("bridge", "head_dim", positive_int),
    "source-layer": ("bridge", "source_layer", non_negative_int),
    "diversity-weight": ("bridge", "diversity_weight", non_negative_float),
    "baselines": ("eval", "baselines", names),
    "max-new-tokens": ("eval", "max_new_tokens", positive_int),
    "latency-samples": ("eval", "latency_samples", non_negative_int),
    "relay-tokens": ("eval", "relay_tokens", positive_int),
    "k-shot": ("eval", "k_shot", positive_int),
}
# On/off fields (--x / --no-x), not sweepable.
SWITCHES = {
    "activation-checkpointing": ("train", "activation_checkpointing"),
    "sender-cache": ("train", "sender_cache"),
}


@dataclass(frozen=True)
class LaunchRequest:
    """What the user asked for, typed: the planner's input (launcher.plan.build_plans)."""

    pair: str | None = None  # SENDER-RECEIVER aliases, or one alias
    sender: str | None = None
    receiver: str | None = None
    gpus: int = 1
    backend: str = "ddp"
    mode: str = "slurm"  # slurm | local | debug
    global_batch: int | None = None
    micro_batch: int | None = None
    cluster: str | None = None  # profile name or path (default: TELEPATHY_CLUSTER, then dgx-h100)
    profile_overrides: dict[str, str | None] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # RunConfig.replace() sections (and top-level fields)
    name: str | None = None
    runs_dir: str | None = None
    sweep: tuple[str, ...] = ()  # "KEY=V1,V2" specs


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    who = parser.add_argument_group("models")
    who.add_argument("--pair", help="SENDER-RECEIVER aliases, e.g. llama3b-qwen3b (one alias = single-model mode)")
    who.add_argument("--sender", help="alias, hub id or local checkpoint directory")
    who.add_argument("--receiver", help="alias, hub id or local checkpoint directory (default: the sender)")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The RunConfig flags and switches (defaults: telepathy/config.py)."""
    group = parser.add_argument_group("run settings (RunConfig fields; defaults in telepathy/config.py)")
    for flag, (section, name, parse) in RUN_FLAGS.items():
        group.add_argument(f"--{flag}", type=parse, default=None, metavar="V", help=f"{section}.{name}")
    for flag, (section, name) in SWITCHES.items():
        group.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=f"{section}.{name}")


def add_layout_flags(parser: argparse.ArgumentParser, *, gpus_default: int | None = 1) -> None:
    group = parser.add_argument_group("GPUs and batch")
    group.add_argument(
        "--gpus", type=positive_int, default=gpus_default, help="total GPUs (or processes with --local on CPU)"
    )
    group.add_argument("--backend", type=choice(*BACKENDS), default=None, help=f"{' | '.join(BACKENDS)} (default ddp)")
    group.add_argument(
        "--global-batch",
        type=positive_int,
        help="samples per optimizer step over all GPUs (default: the memory table's)",
    )
    group.add_argument(
        "--micro-batch", type=positive_int, help="per-GPU micro-batch (default: table row or memory model)"
    )
    add_profile_flags(parser)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """RunConfig.replace() sections (and top-level fields) for every run flag given on the command line."""
    sections: dict[str, Any] = {}
    fields = {flag: (section, name) for flag, (section, name, _) in RUN_FLAGS.items()} | SWITCHES
    for flag, (section, name) in fields.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            if section:
                sections.setdefault(section, {})[name] = value
            else:
                sections[name] = value
    return sections


def request_from_args(args: argparse.Namespace, *, mode: str | None = None) -> LaunchRequest:
    """What the user asked for, as the planner's typed input."""
    return LaunchRequest(
        pair=args.pair,
        sender=args.sender,
        receiver=args.receiver,
        gpus=args.gpus if args.gpus is not None else 1,
        backend=args.backend or "ddp",
        mode=mode or getattr(args, "mode", None) or "slurm",
        global_batch=args.global_batch,
        micro_batch=args.micro_batch,
        cluster=args.cluster,
        profile_overrides=profile_overrides(args),
        overrides=overrides_from_args(args),
        name=getattr(args, "name", None),
        runs_dir=getattr(args, "runs_dir", None),
        sweep=tuple(getattr(args, "sweep", None) or ()),
    )
