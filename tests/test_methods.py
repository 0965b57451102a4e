"""The trained baselines' models (telepathy/step.py): prompt tuning and LoRA train only their own parameters
through the same backend code as the bridge, and a LoRA run's baselines read the receiver without its
adapters; evaluation lets go of the training copy before it builds another."""

import gc
import types
import weakref

import pytest
import torch
from torch import nn

from telepathy.backends import FSDPWrapped, Wrapped
from telepathy.config import RunConfig
from telepathy.data import Collator, load_task
from telepathy.loading import load_model
from telepathy.registry import load_registry
from telepathy.step import build_telepathy_model

PAIR = load_registry().pair("tiny-llama-tiny-qwen")


@pytest.mark.parametrize("method", ["prompt_tuning", "lora"])
def test_receiver_side_methods_train_only_their_own_parameters(method):
    cfg = RunConfig(sender="tiny-llama", receiver="tiny-qwen", run_dir="unused", method=method).replace(
        bridge={"soft_tokens": 4}, data={"task": "demo", "max_length": 48}, train={"lr": 1e-2, "warmup_steps": 0}
    )
    model, stok, rtok = build_telepathy_model(cfg, PAIR, "cpu")
    assert model.sender is None and model.reads == "receiver"
    task = load_task(cfg.data)
    batch = Collator(task.spec, stok, rtok, 48, 16, reads="receiver")(task.train[:4])
    assert batch.primer_mask is not None and (batch.primer_mask[:, -1] == 1).all()  # left-padded prompts
    trained = dict(model.bridge.named_parameters())
    assert trained and all(p.dtype == torch.float32 and p.requires_grad for p in trained.values())
    frozen = {n: p.detach().clone() for n, p in model.receiver.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    wrapped = Wrapped(model, cfg)
    for _ in range(2):
        wrapped.micro_step(batch, last=True)
        wrapped.optimizer_step()
    assert all(not torch.equal(before[n], p) for n, p in trained.items())
    assert all(torch.equal(frozen[n], p) for n, p in model.receiver.named_parameters() if n in frozen)
    assert set(wrapped.bridge_state()) == set(before)  # what a checkpoint holds: the trained part only
    optimizer = weakref.ref(wrapped.optimizer)
    wrapped.release_optimizer()
    gc.collect()
    assert optimizer() is None  # evaluation does not keep AdamW's moments
    if method == "lora":  # a baseline on a LoRA run reads the receiver as loaded
        ids = torch.tensor([[1, 2, 3, 4]])
        plain = load_model(PAIR.receiver, device="cpu", attn_implementation="sdpa", dtype=model.compute_dtype)
        with torch.no_grad():
            adapted = model.receiver.lm(input_ids=ids).logits
            with model.baseline():
                off = model.receiver.lm(input_ids=ids).logits
            assert torch.equal(off, plain(input_ids=ids).logits) and not torch.equal(adapted, off)


def test_a_sharded_training_copy_is_released_before_the_evaluation_copy_is_built():
    training_copy = nn.Linear(4, 4)
    seen = weakref.ref(training_copy)
    fake = types.SimpleNamespace(model=training_copy, bridge=training_copy, optimizer=object(), scheduler=object())
    del training_copy

    def rebuild():
        assert seen() is None, "the training copy is still resident while the evaluation copy loads"
        return types.SimpleNamespace(bridge=nn.Linear(4, 4))

    state = nn.Linear(4, 4).state_dict()
    model = FSDPWrapped.local_model(fake, state, rebuild)
    assert torch.equal(model.bridge.weight, state["weight"]) and fake.model is None and fake.optimizer is None
