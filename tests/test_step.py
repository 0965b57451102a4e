"""The training step: the fast path equals the straightforward step; the model's parts behave."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from telepathy.config import BridgeConfig, DataConfig, RunConfig, TrainConfig
from telepathy.data import Collator, load_task
from telepathy.registry import load_registry
from telepathy.step import Batch, batch_diversity, build_telepathy_model, source_layer

REG = load_registry()


def _cfg(pair: str, **train) -> RunConfig:
    p = REG.pair(pair)
    return RunConfig(
        sender=p.sender.alias,
        receiver=p.receiver.alias,
        run_dir="unused",
        bridge=BridgeConfig(soft_tokens=4, depth=2, heads=4),
        train=TrainConfig(**train),
        data=DataConfig(task="demo", max_length=48),
    )


@pytest.fixture(scope="module")
def built():
    cfg = _cfg("tiny-llama-tiny-qwen")
    model, stok, rtok = build_telepathy_model(cfg, REG.pair("tiny-llama-tiny-qwen"), "cpu")
    task = load_task(cfg.data)
    collate = Collator(task.spec, stok, rtok, cfg.data.max_length, cfg.data.answer_length)
    return cfg, model, collate, task


def _straightforward_loss(cfg, model, full_sender, batch: Batch, pad_to: int) -> torch.Tensor:
    """The original's step: sender padded to max_length with ALL hidden states, full-position receiver
    logits and HF's own `labels` loss."""
    b, s = batch.sender_ids.shape
    ids = F.pad(batch.sender_ids, (0, pad_to - s), value=0)
    mask = F.pad(batch.sender_mask, (0, pad_to - s), value=0)
    with torch.no_grad():
        states = full_sender(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    autocast = model.compute_dtype != torch.float32
    with torch.autocast("cpu", dtype=model.compute_dtype, enabled=autocast):
        soft = model.bridge(states[source_layer(cfg.bridge, REG.get(cfg.sender))], mask)
    lm = model.receiver.lm
    emb = lm.get_input_embeddings()
    prefix = torch.cat([emb(batch.primer_ids), soft.to(emb.weight.dtype)], 1)
    embeds = torch.cat([prefix, emb(batch.answer_ids)], 1)
    attn = torch.cat([torch.ones(b, prefix.size(1), dtype=torch.long), batch.answer_mask], 1)
    labels = torch.cat(
        [torch.full((b, prefix.size(1)), -100), batch.answer_ids.masked_fill(batch.answer_mask == 0, -100)], 1
    )
    return lm(inputs_embeds=embeds, attention_mask=attn, labels=labels).loss


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fast_path_equals_straightforward_step(built, dtype, tol):
    from telepathy.loading import load_model

    cfg, model, collate, task = built
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    cfg = cfg.replace(train={"precision": precision})
    full = load_model(REG.get(cfg.sender), device="cpu", attn_implementation="sdpa", dtype=dtype)
    model, _, _ = build_telepathy_model(cfg, REG.pair("tiny-llama-tiny-qwen"), "cpu")
    batch = collate(task.train[:6])
    assert batch.sender_ids.size(1) < cfg.data.max_length  # per-batch padding is in play
    fast = model(batch).lm_loss
    slow = _straightforward_loss(cfg, model, full, batch, cfg.data.max_length)
    assert fast.dtype == torch.float32
    assert abs(fast.item() - slow.item()) <= tol * max(1.0, abs(slow.item())), (fast.item(), slow.item())


def test_truncated_sender_equals_hidden_state_at_tap(built):
    from telepathy.loading import load_model

    cfg, model, collate, task = built
    batch = collate(task.train[:3])
    full = load_model(REG.get(cfg.sender), device="cpu", attn_implementation="sdpa", dtype=model.compute_dtype)
    want = full(input_ids=batch.sender_ids, attention_mask=batch.sender_mask, output_hidden_states=True).hidden_states
    got = model.sender(input_ids=batch.sender_ids, attention_mask=batch.sender_mask).last_hidden_state
    tap = source_layer(cfg.bridge, REG.get(cfg.sender))
    assert len(model.sender.layers) == tap and tap == REG.get(cfg.sender).layers - 1
    assert torch.equal(got, want[tap])
    assert not hasattr(model.sender, "lm_head")


def test_only_bridge_trains_and_gets_gradients(built):
    cfg, model, collate, task = built
    model.train()
    assert not model.receiver.lm.training and not model.sender.training and model.bridge.training
    out = model(collate(task.train[:4]))
    out.loss.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.receiver.parameters())
    torch.testing.assert_close(out.loss.detach(), out.lm_loss + cfg.bridge.diversity_weight * out.diversity)
    model.zero_grad(set_to_none=True)


def test_cached_sender_states_give_the_same_loss(built):
    _, model, collate, task = built
    batch = collate(task.train[:4])
    with torch.no_grad():
        states = model.sender(input_ids=batch.sender_ids, attention_mask=batch.sender_mask).last_hidden_state
        cached = dataclasses.replace(batch, sender_ids=None, sender_states=states)
        assert torch.equal(model(batch).loss, model(cached).loss)


def test_batch_diversity():
    same = torch.ones(3, 2, 4)
    assert batch_diversity(same).item() == pytest.approx(1.0)
    orthogonal = torch.eye(4).reshape(4, 1, 4)
    assert batch_diversity(orthogonal).item() == pytest.approx(0.0)
    assert batch_diversity(torch.randn(1, 2, 4)).item() == 0.0


def test_same_seed_same_bridge_other_seed_differs():
    pair = REG.pair("tiny-mistral-tiny-llama")
    a, _, _ = build_telepathy_model(_cfg("tiny-mistral-tiny-llama", seed=1), pair, "cpu")
    b, _, _ = build_telepathy_model(_cfg("tiny-mistral-tiny-llama", seed=1), pair, "cpu")
    c, _, _ = build_telepathy_model(_cfg("tiny-mistral-tiny-llama", seed=2), pair, "cpu")
    sa, sb, sc = (m.bridge.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["latents"], sc["latents"])
    assert torch.equal(a.receiver.lm.lm_head.weight, b.receiver.lm.lm_head.weight)


def test_activation_checkpointing_recomputes_and_keeps_the_gradients(built, monkeypatch):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    _, model, collate, task = built
    batch = collate(task.train[:4])
    pair = REG.pair("tiny-llama-tiny-qwen")
    ckpt, _, _ = build_telepathy_model(_cfg("tiny-llama-tiny-qwen", activation_checkpointing=True), pair, "cpu")
    layers = ckpt.receiver.lm.model.layers
    assert all(isinstance(layer, CheckpointWrapper) for layer in layers)
    runs = []  # each receiver layer's MLP runs in forward and again in backward (the recompute)
    mlp = type(layers[0]._checkpoint_wrapped_module.mlp)  # counted in the class: recompute skips module hooks
    forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda self, x: (runs.append(1), forward(self, x))[1])
    grads = []
    for m in (model, ckpt):
        m.zero_grad(set_to_none=True)
        runs.clear()
        m(batch).loss.backward()
        grads.append(m.bridge.latents.grad.clone())
        m.zero_grad(set_to_none=True)
    assert len(runs) == 2 * len(layers)
    torch.testing.assert_close(grads[0], grads[1])


def test_single_model_pair_shares_the_weights():
    model, _, _ = build_telepathy_model(_cfg("tiny-llama"), REG.pair("tiny-llama"), "cpu")
    lm = model.receiver.lm
    assert model.sender.embed_tokens is lm.model.embed_tokens
    assert all(a is b for a, b in zip(model.sender.layers, lm.model.layers))
    assert len(model.sender.layers) == REG.get("tiny-llama").layers - 1
    stored = {p.data_ptr() for p in model.parameters()}
    assert len(stored) == len(
        {p.data_ptr() for p in lm.parameters()} | {p.data_ptr() for p in model.bridge.parameters()}
    )


def test_meta_build_is_full_size_and_weightless():
    pair = REG.pair("llama8b-qwen7b")
    cfg = RunConfig(sender="llama8b", receiver="qwen7b", run_dir="unused")
    model, stok, rtok = build_telepathy_model(cfg, pair, "cpu", meta=True)
    assert stok is None and rtok is None
    assert all(p.is_meta for p in model.parameters())
    counts = pair.sender.param_counts()
    sender = sum(p.numel() for p in model.sender.parameters())
    assert sender == counts["embed"] + counts["layer"] * (pair.sender.layers - 1)
    assert sum(p.numel() for p in model.receiver.parameters()) == pair.receiver.n_params
    # frozen models in the compute dtype (bf16: what GPUs run), the bridge's master weights in fp32
    assert model.receiver.lm.lm_head.weight.dtype == torch.bfloat16 and model.bridge.latents.dtype == torch.float32


def test_source_layer_bounds():
    from telepathy.errors import UserError

    spec = REG.get("tiny-llama")
    assert source_layer(BridgeConfig(), spec) == spec.layers - 1
    assert source_layer(BridgeConfig(source_layer=2), spec) == 2
    with pytest.raises(UserError, match="source_layer"):
        source_layer(BridgeConfig(source_layer=spec.layers + 1), spec)


def test_mixed_precision_moves_weights_that_bf16_would_freeze(built):
    """AdamW at lr 2e-4 changes a weight by ~2e-4 per step; in bf16 a weight near 1.0 has a spacing of 2^-7,
    so such updates round away (LayerNorm gains, output_scale). With fp32 master weights they accumulate."""
    from telepathy.backends import Wrapped

    cfg, model, collate, task = built
    cfg = cfg.replace(train={"lr": 2e-4, "warmup_steps": 0, "weight_decay": 0.01, "precision": "bf16"})
    fresh, _, _ = build_telepathy_model(cfg, REG.pair("tiny-llama-tiny-qwen"), "cpu")
    assert fresh.compute_dtype == torch.bfloat16 and fresh.bridge.latents.dtype == torch.float32
    gains = {
        n: p.detach().clone()
        for n, p in fresh.bridge.named_parameters()
        if n.endswith(("ln_cross.weight", "output_scale"))
    }
    assert all(torch.all(g == 1.0) for n, g in gains.items() if n.endswith("weight"))
    wrapped = Wrapped(fresh.train(), cfg)
    for step in range(2):  # bf16 compute: two small steps (bf16 matmuls are slow on CPUs without AVX-512 bf16)
        wrapped.micro_step(collate(task.train[2 * step : 2 * step + 2]), last=True)
        wrapped.optimizer_step()
    after = dict(fresh.bridge.named_parameters())
    assert all(not torch.equal(after[n], g) for n, g in gains.items()), "fp32 master weights moved"
    # the same updates applied to bf16 copies of the gains are rounded away
    bf16 = {n: g.bfloat16() for n, g in gains.items() if n.endswith("weight")}
    assert all(torch.equal((g + (after[n] - gains[n]).bfloat16()).float(), g.float()) for n, g in bf16.items())
