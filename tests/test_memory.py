"""The analytic memory model (telepathy.memory): torch-free, by component, per backend; batch choice from it."""

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import REPO

from telepathy import memory
from telepathy.config import BridgeConfig
from telepathy.errors import UserError
from telepathy.registry import Pair, load_registry
from telepathy.shape import StepShape

REG = load_registry()
BIG = REG.pair("llama8b-mistral7b")
GIB = 2**30


def shape(pair=BIG, **kw):
    kw.setdefault("seq_len", 1536)
    return StepShape(pair, **kw)


def est(pair=BIG, micro_batch=8, **kw):
    return memory.estimate(shape(pair, **kw), micro_batch)


def test_imports_without_torch():
    code = "import sys; import telepathy.memory, telepathy.shape; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "False"


def test_frozen_weights_count_only_what_is_built():
    s, r = BIG.sender.param_counts(), BIG.receiver.param_counts()
    counts = memory.frozen_param_counts(BIG, BridgeConfig())
    # tap = hidden_states[31]: embeddings + 31 of 32 layers, no final norm, no LM head
    assert counts == {"sender": s["embed"] + 31 * s["layer"], "receiver": r["total"]}
    assert memory.frozen_param_counts(BIG, BridgeConfig(source_layer=16))["sender"] == s["embed"] + 16 * s["layer"]
    single = REG.pair("llama8b")
    assert memory.frozen_param_counts(single, BridgeConfig()) == {"sender": 0, "receiver": single.receiver.n_params}
    e = est()
    assert e.components["frozen_weights"] == pytest.approx(2 * sum(counts.values()) / GIB)
    assert e.components["bridge_params"] == pytest.approx(4 * memory.bridge_params(BIG, BridgeConfig()) / GIB)  # fp32


def test_components_sum_to_total_and_serialise():
    e = est()
    assert set(e.components) == set(memory.COMPONENTS)
    assert e.total_gib == pytest.approx(sum(e.components.values()))
    assert e.total_gib == pytest.approx(max(e.phases.values()))
    d = json.loads(json.dumps(e.to_dict()))
    assert d["total_gib"] == pytest.approx(e.total_gib, abs=1e-3) and d["phase"] == e.phase


def test_backends_shard_what_they_shard():
    ddp, fsdp = est(backend="ddp", world_size=8), est(backend="fsdp", world_size=8)
    zero2, zero3 = est(backend="deepspeed", world_size=8), est(backend="deepspeed", world_size=8, zero_stage=3)
    assert fsdp.components["frozen_weights"] == pytest.approx(ddp.components["frozen_weights"] / 8)
    # DeepSpeed wraps only the bridge: the frozen models stay replicated
    assert zero2.components["frozen_weights"] == ddp.components["frozen_weights"]
    assert zero3.components["bridge_params"] < zero2.components["bridge_params"] == ddp.components["bridge_params"]
    # ZeRO shards AdamW's fp32 state; plain AdamW keeps two bf16 moments
    assert zero2.components["optimizer"] == pytest.approx(12 * memory.bridge_params(BIG, BridgeConfig()) / 8 / GIB)
    assert ddp.components["optimizer"] == pytest.approx(2 * ddp.components["bridge_params"])
    # DDP's gradient buckets exist from two GPUs on
    assert est(backend="ddp", world_size=2).components["comm_buffers"] == pytest.approx(ddp.components["bridge_params"])
    assert est(backend="ddp", world_size=1).components["comm_buffers"] == 0
    assert fsdp.total_gib < zero2.total_gib < ddp.total_gib


def test_knobs_move_the_estimate_the_right_way():
    base = est(micro_batch=32).total_gib
    assert est(micro_batch=64).total_gib > base > est(micro_batch=16).total_gib
    assert est(micro_batch=32, seq_len=4096).total_gib > base
    assert est(micro_batch=32, activation_checkpointing=True).total_gib < base
    assert est(micro_batch=32, answer_only_logits=False).total_gib > base
    assert (
        est(micro_batch=32, attention="eager").total_gib
        > base
        > est(micro_batch=32, attention="flash_attention_2").total_gib
    )
    # fp32 compute: frozen weights and activations double; the bridge trains fp32 either way
    fp32 = est(micro_batch=32, compute_dtype="fp32")
    assert fp32.components["frozen_weights"] == pytest.approx(2 * est(micro_batch=32).components["frozen_weights"])
    assert fp32.components["optimizer"] == est(micro_batch=32).components["optimizer"]


def test_peak_phase_moves_from_gradients_to_activations():
    # At micro-batch 1 the peak is where the bridge's gradients are whole (its backward's end or the
    # optimizer step); at 64 it is where the frozen models' activations are.
    assert est(micro_batch=1).phase in ("bridge_backward", "optimizer")
    assert est(micro_batch=64).phase in ("sender", "receiver")


def test_max_micro_batch_is_the_boundary():
    usable = memory.usable_gib(80)
    n = memory.max_micro_batch(shape(), 80)
    assert n > 8
    assert est(micro_batch=n).total_gib <= usable < est(micro_batch=n + 1).total_gib
    # a stated margin in GiB replaces the default one
    assert memory.max_micro_batch(shape(), 80, safety_margin_gib=0.0) > n


def test_margin_is_defined_once_and_stated():
    assert memory.usable_gib(80) == pytest.approx(80e9 / GIB - memory.safety_margin_gib(80))
    assert memory.safety_margin_gib(80) == pytest.approx(
        memory.CONTEXT_RESERVE_GIB + memory.FRAGMENTATION_SHARE * 80e9 / GIB
    )
    text = memory.margin_text(80)
    assert f"{memory.usable_gib(80):.1f} GiB usable" in text and "fragmentation" in text


def test_weights_that_cannot_fit():
    assert not memory.weights_fit(shape(backend="ddp"), 24)
    assert memory.weights_fit(shape(backend="fsdp", world_size=8), 24)
    assert memory.max_micro_batch(shape(), 24) == 0


def test_bad_knobs_are_user_errors():
    with pytest.raises(UserError, match="unknown backend"):
        est(backend="horovod")
    with pytest.raises(UserError, match="unknown attention"):
        est(attention="flash3")
    with pytest.raises(UserError, match="source_layer"):
        est(bridge=BridgeConfig(source_layer=40))
    with pytest.raises(UserError, match="single-model"):
        est(pair=REG.pair("llama8b"), backend="fsdp", world_size=4)


def test_truncated_architecture_scales_with_layers():
    """Fewer receiver layers, fewer saved activations: the per-layer term is linear in the layer count."""
    half = Pair(BIG.sender, dataclasses.replace(BIG.receiver, layers=16))
    quarter = Pair(BIG.sender, dataclasses.replace(BIG.receiver, layers=8))

    def act(p):
        return est(pair=p, micro_batch=64).phases["receiver"] - est(pair=p, micro_batch=0).phases["receiver"]

    assert act(BIG) - act(half) == pytest.approx(2 * (act(half) - act(quarter)))  # 16 layers vs 8 layers
    assert act(quarter) > 0
