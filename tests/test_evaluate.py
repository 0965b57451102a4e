"""Evaluation: eval.json schema for every method, batched generation = one-by-one, the table."""

import json

import pytest
import torch

from telepathy.config import BridgeConfig, DataConfig, EvalConfig, RunConfig
from telepathy.data import load_task
from telepathy.evaluate import _Evaluator, evaluate, format_eval_table, full_sender
from telepathy.registry import load_registry
from telepathy.step import build_telepathy_model

REG = load_registry()
PAIR = REG.pair("tiny-llama-tiny-qwen")


@pytest.fixture(scope="module")
def setup():
    cfg = RunConfig(
        sender="tiny-llama",
        receiver="tiny-qwen",
        run_dir="unused",
        bridge=BridgeConfig(soft_tokens=4, depth=1, heads=4),
        data=DataConfig(task="demo", max_length=48, eval_samples=12),
        eval=EvalConfig(max_new_tokens=3, relay_tokens=4, latency_samples=2, batch_size=5),
    )
    model, stok, rtok = build_telepathy_model(cfg, PAIR, "cpu")
    return cfg, model, (stok, rtok), load_task(cfg.data), full_sender(model, PAIR, "cpu")


def test_eval_json_schema_for_all_methods(setup):
    cfg, model, toks, task, sender_lm = setup
    model.train()
    result = evaluate(model, task, toks, cfg.eval, "cpu", data_cfg=cfg.data, sender_lm=sender_lm)
    assert model.training and not model.receiver.training  # mode restored, frozen parts stay eval
    json.dumps(result)  # eval.json-serialisable
    assert result["n"] == 12 and result["labels"] == ["animal", "food", "weather", "sport"]
    assert list(result["methods"]) == ["bridge", "receiver", "sender", "text_relay"] and result["skipped"] == []
    for method, r in result["methods"].items():
        assert sum(c["n"] for c in r["per_class"].values()) == 12
        assert r["accuracy"] == sum(c["correct"] for c in r["per_class"].values()) / 12 == result["accuracy"][method]
        assert 0 <= r["unmatched"] <= 12 and len(r["samples"]) == 5
    assert len(set(result["methods"]["receiver"]["samples"])) == 1  # primer only: one answer for all
    assert set(result["latency_ms"]) == {"bridge", "text_relay"}
    assert all(v["n"] == 2 and v["median"] > 0 for v in result["latency_ms"].values())
    table = format_eval_table(result)
    assert "text_relay" in table and "chance 25.0%" in table and "%" in table.splitlines()[2]


def test_baselines_needing_the_full_sender_are_skipped_without_it(setup):
    cfg, model, toks, task, _ = setup
    result = evaluate(model, task, toks, EvalConfig(max_new_tokens=2, latency_samples=0), "cpu", data_cfg=cfg.data)
    assert list(result["methods"]) == ["bridge", "receiver"] and result["skipped"] == ["sender", "text_relay"]
    assert result["latency_ms"] == {}
    assert "skipped" in format_eval_table(result)


@pytest.mark.parametrize("method", ["bridge", "sender", "text_relay"])
def test_batched_generation_equals_one_by_one(setup, method):
    """Left padding and the all-ones bridge mask: a batch generates what each example generates alone."""
    cfg, model, toks, task, sender_lm = setup
    ev = _Evaluator(model, task, toks, cfg.eval, cfg.data, torch.device("cpu"), sender_lm)
    examples = task.eval[:4]
    assert len({len(ev.collate.sender_ids(e.text)) for e in examples}) > 1  # rows really are padded
    with torch.no_grad():
        batched = getattr(ev, method)(examples)
        alone = [getattr(ev, method)([e])[0] for e in examples]
    assert batched == alone


def test_full_sender_is_the_whole_model_and_shared_for_a_single_pair(setup):
    cfg, model, _, _, sender_lm = setup
    assert len(sender_lm.model.layers) == PAIR.sender.layers and hasattr(sender_lm, "lm_head")
    # Its first layers are the training sender's body: the same seeded weights.
    assert torch.equal(sender_lm.model.layers[0].mlp.up_proj.weight, model.sender.layers[0].mlp.up_proj.weight)
    single_cfg = cfg.replace(sender="tiny-llama", receiver="tiny-llama")
    single, _, _ = build_telepathy_model(single_cfg, REG.pair("tiny-llama"), "cpu")
    assert full_sender(single, REG.pair("tiny-llama"), "cpu") is single.receiver.lm
