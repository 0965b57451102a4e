"""Calibration: the analytic estimate (telepathy.memory) against a fake-tensor trace of the real step
(telepathy.trace) within 5 %, over the three families as sender and receiver, DDP and FSDP, several
micro-batches, tiny and mid-size (real widths, few layers) architectures. Full-size seed pairs:
TELEPATHY_SLOW=1 (bench/memory_report.py writes the same comparison into the README's table)."""

import dataclasses
import os

import pytest

from telepathy import memory, trace
from telepathy.config import BridgeConfig
from telepathy.errors import UserError
from telepathy.registry import Pair, load_registry
from telepathy.shape import StepShape

REG = load_registry()


def pair(name: str, layers: int | None = None) -> Pair:
    """A registry pair; with `layers`, both models keep their real widths but only that many layers."""
    p = REG.pair(name)
    if layers is None:
        return p
    s, r = (dataclasses.replace(m, layers=layers) for m in (p.sender, p.receiver))
    return Pair(s, s) if p.single else Pair(s, r)


CASES = [  # (id, pair, step shape + micro_batch): sender/receiver families, backend, world, micro-batch, sender tokens
    ("tiny-llama>qwen-ddp-b4", pair("tiny-llama-tiny-qwen"), dict(micro_batch=4, seq_len=64)),
    (
        "tiny-qwen>mistral-fsdp2-b8",
        pair("tiny-qwen-tiny-mistral"),
        dict(backend="fsdp", world_size=2, micro_batch=8, seq_len=96),
    ),
    (
        "tiny-mistral>llama-ddp4-b16",
        pair("tiny-mistral-tiny-llama"),
        dict(backend="ddp", world_size=4, micro_batch=16, seq_len=48),
    ),
    ("mistral7b>qwen7b-ddp-b64", pair("mistral7b-qwen7b", 2), dict(micro_batch=64, seq_len=512)),
    (
        "qwen3b>llama3b-ddp-ckpt-b32",
        pair("qwen3b-llama3b", 3),
        dict(micro_batch=32, seq_len=256, activation_checkpointing=True),
    ),
    (
        "llama8b>mistral7b-fsdp8-b2",
        pair("llama8b-mistral7b", 2),
        dict(backend="fsdp", world_size=8, micro_batch=2, seq_len=1536),
    ),
    (
        "mistral7b>llama8b-fsdp8-b12",
        pair("mistral7b-llama8b", 2),
        dict(backend="fsdp", world_size=8, micro_batch=12, seq_len=1024),
    ),
    (
        "qwen1.5b>llama1b-fsdp4-b24",
        pair("qwen1.5b-llama1b", 3),
        dict(backend="fsdp", world_size=4, micro_batch=24, seq_len=1024),
    ),
    ("llama3b-single-ddp-b48", pair("llama3b", 3), dict(micro_batch=48, seq_len=384)),
    (
        "fp32-qwen3b>mistral7b-ddp-b16",
        pair("qwen3b-mistral7b", 2),
        dict(micro_batch=16, seq_len=512, compute_dtype="fp32"),
    ),
    ("cached-llama8b>qwen7b-ddp-b32", pair("llama8b-qwen7b", 2), dict(micro_batch=32, seq_len=1536, sender_cache=True)),
    (
        "cached-llama8b>qwen7b-fsdp4-b32",
        pair("llama8b-qwen7b", 2),
        dict(backend="fsdp", world_size=4, micro_batch=32, seq_len=1536, sender_cache=True),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_analytic_matches_trace_within_5_percent(case):
    _, p, knobs = case
    micro_batch = knobs.pop("micro_batch")
    shape = StepShape(p, **knobs)
    traced = trace.trace(shape, micro_batch)
    est = memory.estimate(shape, micro_batch)
    assert est.total_gib == pytest.approx(traced.peak_gib, rel=0.02), (traced.to_dict(), est.to_dict())
    # the parts that do not depend on the step's order of events are exact
    for part in ("frozen_weights", "bridge_params", "optimizer"):
        assert est.components[part] == pytest.approx(traced.components[part], rel=1e-3), part


def test_trace_is_the_real_step_with_progress():
    lines = []
    p = pair("tiny-llama-tiny-mistral")
    r = trace.trace(StepShape(p, seq_len=32), 2, progress=lines.append)
    assert any("step 2 of 2" in line for line in lines)
    assert [line.split()[0] for line in lines if line.startswith("  ")] == [
        "sender",
        "receiver",
        "bridge_backward",
        "optimizer",
    ]
    assert set(r.phases) == {"sender", "receiver", "bridge_backward", "optimizer"}
    assert r.peak_gib == pytest.approx(max(sum(c.values()) for c in r.phases.values()))
    # AdamW state traced in the second step: two fp32 moments per bridge parameter
    assert r.components["optimizer"] == pytest.approx(
        2 * 4 * memory.bridge_params(p, BridgeConfig()) / memory.GIB, rel=1e-3
    )


def test_deepspeed_is_not_traced():
    with pytest.raises(UserError, match="supports ddp and fsdp"):
        trace.trace(StepShape(pair("tiny-llama-tiny-qwen"), backend="deepspeed", seq_len=8), 1)


SEED_PAIRS = [
    "llama8b-mistral7b",
    "llama3b-mistral7b",
    "llama3b-qwen3b",
    "llama1b-qwen1.5b",
    "llama8b",
    "mistral7b",
    "llama3b",
]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TELEPATHY_SLOW") != "1", reason="full-size traces: set TELEPATHY_SLOW=1")
@pytest.mark.parametrize("name", SEED_PAIRS)
@pytest.mark.parametrize("backend,world", [("ddp", 8), ("fsdp", 8)])
def test_full_size_seed_pairs(name, backend, world):
    p = REG.pair(name)
    if p.single and backend == "fsdp":
        pytest.skip("fsdp cannot shard a single-model pair")
    shape = StepShape(p, backend=backend, world_size=world, seq_len=1536)
    fits = memory.max_micro_batch(shape, 80)
    for b in (2, fits):
        traced = trace.trace(shape, b)
        assert memory.estimate(shape, b).total_gib == pytest.approx(traced.peak_gib, rel=0.02)
    assert traced.peak_gib <= memory.usable_gib(80) * 1.05
