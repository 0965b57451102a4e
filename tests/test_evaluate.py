"""Evaluation: eval.json and predictions.jsonl for every method, batched generation = one-by-one, label
scoring = the straightforward log-likelihood of each label alone, the full sender completed from its body."""

import json

import pytest
import torch
import torch.nn.functional as F

from telepathy.config import BridgeConfig, DataConfig, EvalConfig, RunConfig
from telepathy.data import load_task
from telepathy.evaluate import Evaluator, evaluate, format_eval_table, full_sender, label_loglik, summarize
from telepathy.loading import load_model
from telepathy.registry import Pair, load_registry
from telepathy.step import build_telepathy_model

REG = load_registry()
PAIR = REG.pair("tiny-llama-tiny-qwen")
BASELINES = ("receiver", "receiver_zero_shot", "sender_zero_shot", "receiver_k_shot", "text_relay")


@pytest.fixture(scope="module")
def setup():
    cfg = RunConfig(
        sender="tiny-llama",
        receiver="tiny-qwen",
        run_dir="unused",
        bridge=BridgeConfig(soft_tokens=4, depth=1, heads=4),
        data=DataConfig(task="demo", max_length=48, eval_samples=12),
        eval=EvalConfig(max_new_tokens=3, relay_tokens=4, latency_samples=2, batch_size=5, k_shot=2),
    )
    model, stok, rtok = build_telepathy_model(cfg, PAIR, "cpu")
    sender_lm = full_sender(PAIR, "cpu", body=model.sender)
    return cfg, model, (stok, rtok), load_task(cfg.data), sender_lm


def test_eval_json_and_predictions_for_every_method(setup):
    cfg, model, toks, task, sender_lm = setup
    model.train()
    methods = ["bridge", *BASELINES]
    result, records = evaluate(
        methods, task, toks, cfg.eval, "cpu", data_cfg=cfg.data, model=model, sender_lm=sender_lm, seed=3
    )
    assert model.training and not model.receiver.training  # mode restored, frozen parts stay eval
    json.dumps(result)  # eval.json-serialisable
    assert result["n"] == 12 and result["labels"] == ["animal", "food", "weather", "sport"]
    assert result["ids"] == [e.id for e in task.eval] and len(set(result["ids"])) == 12
    assert list(result["methods"]) == methods and result["skipped"] == []
    assert len(records) == 12 * len(methods)
    for method, r in result["methods"].items():
        mine = [x for x in records if x["method"] == method]
        assert [x["id"] for x in mine] == result["ids"]
        assert r == summarize(mine, task.spec.labels)  # eval.json is what the predictions say
        assert r["accuracy"] == sum(x["generated_label"] == x["gold"] for x in mine) / 12 == result["accuracy"][method]
        assert r["scored_accuracy"] == sum(x["scored_label"] == x["gold"] for x in mine) / 12
        for x in mine:
            assert x["scored_label"] == max(x["loglik"], key=x["loglik"].get)
            assert (
                x["generated_label"] is None
                or x["generated_label"] == task.spec.labels[task.spec.match(x["generated"])]
            )
    assert len({x["generated"] for x in records if x["method"] == "receiver"}) == 1  # primer only: one answer
    assert set(result["latency_ms"]) == {"bridge", "receiver_zero_shot", "text_relay"}
    assert all(v["n"] == 2 and v["median"] > 0 for v in result["latency_ms"].values())
    table = format_eval_table(result)
    assert "text_relay" in table and "chance 25.0%" in table and "scored" in table.splitlines()[1]


def test_methods_without_their_models_are_skipped(setup):
    cfg, model, toks, task, _ = setup
    e = EvalConfig(max_new_tokens=2, latency_samples=0)
    result, _ = evaluate(["bridge", "receiver", "text_relay", "sender_zero_shot"], task, toks, e, "cpu", model=model)
    assert list(result["methods"]) == ["bridge", "receiver"]
    assert result["skipped"] == ["text_relay", "sender_zero_shot"] and result["latency_ms"] == {}
    assert "skipped" in format_eval_table(result)


@pytest.mark.parametrize(
    "method", ["bridge", "receiver_zero_shot", "sender_zero_shot", "receiver_k_shot", "text_relay"]
)
def test_batched_readings_equal_one_by_one(setup, method):
    """Left padding with position ids from the mask: a batch generates and scores what each example does alone."""
    cfg, model, toks, task, sender_lm = setup
    ev = Evaluator(task, toks, cfg.eval, cfg.data, torch.device("cpu"), model=model, sender_lm=sender_lm, seed=3)
    examples = task.eval[:4]
    assert len({len(ev.collate.sender_ids(e.text)) for e in examples}) > 1  # rows really are padded
    with torch.no_grad():
        texts, scores = ev.readings(method, examples)
        alone = [ev.readings(method, [e]) for e in examples]
    assert texts == [t[0] for t, _ in alone]
    assert torch.allclose(scores, torch.cat([s for _, s in alone]), atol=2e-2)


def test_label_scoring_is_each_labels_log_likelihood_alone(setup):
    """One forward of B x L rows (left-padded prefixes, right-padded labels) equals, for each example and label,
    the summed log-probability of the label's tokens from a plain forward of prompt + label ids."""
    cfg, model, toks, task, _ = setup
    ev = Evaluator(task, toks, cfg.eval, cfg.data, torch.device("cpu"), model=model)
    lm, examples = model.receiver.lm, task.eval[:3]
    labels = ev.label_ids["receiver"][:2] + [[1734, 88], [315, 9906, 13]]  # labels of 1 to 3 tokens: padded too
    with torch.no_grad():
        got = label_loglik(ev.receiver_zero_shot(examples), labels)
        rows = ev.collate.receiver_examples(examples)
        for i, row in enumerate(rows):
            for j, label in enumerate(labels):
                ids = torch.tensor([list(row) + list(label)])
                logp = F.log_softmax(lm(input_ids=ids).logits[0].float(), -1)
                want = sum(logp[len(row) - 1 + t, tok] for t, tok in enumerate(label))
                assert got[i, j] == pytest.approx(float(want), abs=2e-2)


def test_full_sender_reuses_the_body_and_equals_a_full_load(setup):
    cfg, model, _, _, sender_lm = setup
    assert len(sender_lm.model.layers) == PAIR.sender.layers and hasattr(sender_lm, "lm_head")
    tap = len(model.sender.layers)
    assert all(sender_lm.model.layers[i] is model.sender.layers[i] for i in range(tap))  # no second copy
    assert sender_lm.model.embed_tokens is model.sender.embed_tokens
    whole = load_model(PAIR.sender, device="cpu", attn_implementation="sdpa", dtype=sender_lm.dtype)
    a, b = sender_lm.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    single_cfg = cfg.replace(sender="tiny-llama", receiver="tiny-llama")
    single, _, _ = build_telepathy_model(single_cfg, REG.pair("tiny-llama"), "cpu")
    assert full_sender(REG.pair("tiny-llama"), "cpu", receiver_lm=single.receiver.lm) is single.receiver.lm


def test_full_sender_from_a_checkpoints_safetensors(tmp_path):
    """A pretrained sender (a save_pretrained folder, sharded): only the missing layers, norm and head are
    read from its safetensors, and the result equals from_pretrained of the whole model. (By hub id from an
    offline cache: tests/test_offline.py evaluates sender_zero_shot that way.)"""
    saved = load_model(REG.get("tiny-mistral"), device="cpu", attn_implementation="sdpa")
    saved.save_pretrained(tmp_path, max_shard_size="1MB")  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    spec = REG.get(str(tmp_path))
    body = load_model(spec, device="cpu", attn_implementation="sdpa", num_layers=2)
    full = full_sender(Pair(spec, REG.get("tiny-qwen")), "cpu", body=body)
    whole = load_model(spec, device="cpu", attn_implementation="sdpa")
    assert full.model.layers[1] is body.layers[1]
    a, b = full.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
