import json

import pytest

from telepathy.errors import UserError
from telepathy.registry import build_hf_config, load_registry

PUBLISHED_B = {
    "llama1b": 1.24,
    "llama3b": 3.21,
    "llama8b": 8.03,
    "mistral7b": 7.25,
    "qwen1.5b": 1.54,
    "qwen3b": 3.09,
    "qwen7b": 7.62,
}


def test_all_fourteen_seed_models_and_aliases():
    reg = load_registry()
    hub = {m.hub_id for m in reg.models.values() if m.hub_id}
    assert len(hub) == 14
    for alias in PUBLISHED_B:
        assert reg.get(alias).hub_id.lower() == reg.get(alias + "-instruct").hub_id.lower().replace("-instruct", "")
        assert reg.get(reg.get(alias).hub_id) is reg.get(alias)  # lookup by hub id


@pytest.mark.parametrize("alias,billions", PUBLISHED_B.items())
def test_param_counts_match_published_sizes(alias, billions):
    assert round(load_registry().get(alias).n_params / 1e9, 2) == pytest.approx(billions, abs=0.006)


@pytest.mark.parametrize("alias", ["llama8b", "qwen7b", "mistral7b", "qwen3b", "tiny-qwen", "tiny-llama"])
def test_hf_config_builds_the_exact_architecture_on_meta(alias):
    import torch
    from transformers import AutoModelForCausalLM

    spec = load_registry().get(alias)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_hf_config(spec))
    assert sum(p.numel() for p in model.parameters()) == spec.n_params
    assert type(model).__name__ == spec.hf_class


def test_truncated_config_is_a_fresh_object():
    spec = load_registry().get("llama8b")
    assert build_hf_config(spec, num_layers=31).num_hidden_layers == 31
    assert build_hf_config(spec).num_hidden_layers == 32


@pytest.mark.parametrize(
    "text,sender,receiver",
    [
        ("llama3b-qwen3b", "llama3b", "qwen3b"),
        ("llama1b-qwen1.5b", "llama1b", "qwen1.5b"),
        ("qwen1.5b-llama1b", "qwen1.5b", "llama1b"),
        ("qwen1.5b-instruct-mistral7b-instruct", "qwen1.5b-instruct", "mistral7b-instruct"),
        ("llama8b-mistral7b", "llama8b", "mistral7b"),
        ("qwen7b-mistral7b", "qwen7b", "mistral7b"),
        ("tiny-llama-tiny-qwen", "tiny-llama", "tiny-qwen"),
        ("tiny-mistral-tiny-llama", "tiny-mistral", "tiny-llama"),
    ],
)
def test_pairs_parse_unambiguously(text, sender, receiver):
    pair = load_registry().pair(text)
    assert (pair.sender.alias, pair.receiver.alias) == (sender, receiver)
    assert not pair.single


def test_every_pair_of_aliases_round_trips():
    reg = load_registry()
    for a in reg.models:
        for b in reg.models:
            if a != b:
                p = reg.pair(f"{a}-{b}")
                assert (p.sender.alias, p.receiver.alias) == (a, b)


def test_single_model_mode():
    pair = load_registry().pair("llama8b")
    assert pair.single and pair.frozen_params == pair.sender.n_params


def test_sender_receiver_by_hub_id_and_local_dir(tmp_path):
    reg = load_registry()
    pair = reg.pair(sender="meta-llama/Llama-3.2-3B", receiver="Qwen/Qwen2.5-3B")
    assert (pair.sender.alias, pair.receiver.alias) == ("llama3b", "qwen3b")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 128,
                "vocab_size": 1000,
                "tie_word_embeddings": True,
            }
        )
    )
    local = reg.pair(sender=str(tmp_path), receiver="tiny-qwen").sender
    assert local.path == str(tmp_path.resolve()) and local.hidden == 64 and local.family == "qwen2"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("llama3b-qwen4b", "did you mean"),
        ("lama3b-qwen3b", "did you mean 'llama3b'"),
        ("llama3b-", "malformed"),
        ("-qwen3b", "malformed"),
        ("gpt4-claude", "unknown pair"),
        ("llama3b qwen3b", "malformed"),
    ],
)
def test_bad_pairs_name_the_problem(text, needle):
    with pytest.raises(UserError, match=needle):
        load_registry().pair(text)
