"""The training step shared by the trainer, the memory tracer and the benchmark.

Fast path: the sender is only its body up to the tapped layer (no later
layers, no LM head, no output_hidden_states), batches are padded per batch, and the receiver's LM head runs
only on the positions that predict answer tokens. tests/test_step.py checks that this equals the
straightforward step (full sender with all hidden states, full-position logits, HF `labels`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from telepathy.bridge import Bridge, target_rms_of
from telepathy.bridge_shape import source_layer
from telepathy.config import RunConfig
from telepathy.loading import compute_dtype, load_device, load_model, load_tokenizer, select_attention
from telepathy.registry import ModelSpec, Pair


@dataclass
class Batch:
    """One micro-batch. Receiver input is [primer, K soft tokens, answer]; the loss covers answer tokens
    where answer_mask is 1 (the label word's tokens and the EOS). With the sender cache, sender_states
    (B,S,d_S) replace sender_ids."""

    sender_ids: torch.Tensor | None  # (B,S) long, right-padded to the batch's longest
    sender_mask: torch.Tensor | None  # (B,S) 1 = real token; None when nothing reads the sender
    primer_ids: torch.Tensor  # (B,P) the task's receiver primer (same for every row), or the receiver's prompt
    answer_ids: torch.Tensor  # (B,A) " {label}" + EOS, right-padded
    answer_mask: torch.Tensor  # (B,A)
    sender_states: torch.Tensor | None = None  # (B,S,d_S) cached tapped-layer states
    labels: torch.Tensor | None = None  # (B,) class index, for evaluation
    primer_mask: torch.Tensor | None = None  # (B,P) for a left-padded receiver prompt; None = all real

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            **{
                f.name: (v.to(device, non_blocking=True) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                for f in dataclasses.fields(self)
            }
        )

    def pin_memory(self) -> Batch:
        """Page-locked host copies: the copy to the GPU then runs asynchronously, beside the compute."""
        return Batch(
            **{
                f.name: (v.pin_memory() if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                for f in dataclasses.fields(self)
            }
        )

    def __len__(self) -> int:
        return self.answer_ids.size(0)

    def input_tokens(self) -> torch.Tensor:
        """Real tokens of what the trained part reads: the sender's input, else the receiver's prompt."""
        if self.sender_mask is not None:
            return self.sender_mask.sum()
        if self.primer_mask is not None:
            return self.primer_mask.sum()
        return self.primer_ids.new_tensor(self.primer_ids.numel())


@dataclass
class StepOutput:
    loss: torch.Tensor  # what backward() is called on: lm_loss + diversity_weight * diversity
    lm_loss: torch.Tensor  # mean CE over real answer tokens (detached)
    diversity: torch.Tensor  # mean off-diagonal cosine similarity of soft tokens in the batch (detached)


def batch_diversity(soft: torch.Tensor) -> torch.Tensor:
    """Mean off-diagonal cosine similarity of the flattened soft tokens across the batch (the original's
    anti-collapse term: identical soft tokens for every input give 1). 0 for a batch of one."""
    b = soft.size(0)
    if b < 2:
        return soft.new_zeros((), dtype=torch.float32)
    flat = F.normalize(soft.float().reshape(b, -1), dim=-1)
    sim = flat @ flat.T
    return (sim.sum() - sim.diagonal().sum()) / (b * (b - 1))


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded mask (what generate() derives from the attention mask): 0 at each row's
    first real token, so a padded row reads its tokens at the positions it would alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def answer_logits(
    lm: nn.Module,
    prefix: torch.Tensor,
    prefix_mask: torch.Tensor | None,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits (B*A, V), fp32, of each answer token given `prefix` (B,P,d embeddings, left-padded under
    `prefix_mask`; None = no padding) and the answer tokens before it: one forward, the LM head only on the
    positions that predict answer tokens. Training (the loss) and label scoring share it."""
    embeds = torch.cat([prefix, lm.get_input_embeddings()(answer_ids)], dim=1)
    b, p, a = prefix.size(0), prefix.size(1), answer_ids.size(1)
    head = answer_mask.new_ones(b, p) if prefix_mask is None else prefix_mask.to(answer_mask.dtype)
    mask = torch.cat([head, answer_mask], dim=1)
    pos = None if prefix_mask is None else positions(mask)
    hidden = lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    # Position t predicts token t+1: answer token j is predicted at p-1+j. Reshape to 2-D before the
    # head: a 3-D strided slice makes the CPU matmul copy the weight once per row.
    h = hidden[:, p - 1 : p - 1 + a].reshape(b * a, -1)
    return lm.lm_head(h).float()


class ReceiverWithHead(nn.Module):
    """The frozen receiver as one module whose forward does the whole receiver side: embedding lookup,
    [primer, soft, answer] layout, the decoder, and the LM head on answer-predicting positions only.
    The embedding lookup must happen inside this forward: under FSDP2 the embedding is sharded with this
    module and is only unsharded during its forward (outside it, embedding meets a DTensor and fails)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def prefix_embeds(self, primer_ids: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """[primer, soft] as receiver input embeddings: the layout training and evaluation share."""
        primer = self.lm.get_input_embeddings()(primer_ids)
        return torch.cat([primer, soft.to(primer.dtype)], dim=1)

    def prefix_mask(self, primer_mask: torch.Tensor | None, soft: torch.Tensor) -> torch.Tensor | None:
        """The mask of [primer, soft] when the primer is a left-padded prompt (None: nothing is padded)."""
        if primer_mask is None:
            return None
        return torch.cat([primer_mask, primer_mask.new_ones(soft.shape[:2])], dim=1)

    def forward(
        self,
        primer_ids: torch.Tensor,
        soft: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        primer_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self.prefix_embeds(primer_ids, soft)
        logits = answer_logits(self.lm, prefix, self.prefix_mask(primer_mask, soft), answer_ids, answer_mask)
        ce = F.cross_entropy(logits, answer_ids.reshape(-1), reduction="none")
        weights = answer_mask.reshape(-1).to(ce.dtype)
        n_tokens = weights.sum()
        return (ce * weights).sum() / n_tokens.clamp(min=1), n_tokens


class TelepathyModel(nn.Module):
    """Frozen sender body (up to the tap) -> trainable bridge -> frozen receiver. Only the bridge trains.
    `sender` is None when batches carry cached sender states.

    Mixed precision: the bridge keeps fp32 weights (so AdamW's small updates are not rounded away: in bf16
    an update below |w|/256 vanishes, e.g. every LayerNorm gain near 1.0 at lr 2e-4) and runs under
    autocast in `compute_dtype`, the dtype the frozen models are held in."""

    method = "bridge"
    reads = "sender"  # what the trained part reads (data.Collator's `reads`)

    def __init__(
        self,
        sender: nn.Module | None,
        bridge: nn.Module,
        receiver: ReceiverWithHead,
        diversity_weight: float,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.sender = sender
        self.bridge = bridge
        self.receiver = receiver
        self.diversity_weight = diversity_weight
        self.compute_dtype = compute_dtype

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.bridge.parameters())

    def receiver_layers(self) -> list[nn.Module]:
        """The receiver's decoder layers: FSDP2 sharding units. Checked on CPU/gloo: fully_shard each
        layer, the bridge, then this whole model as root (embeddings, norms and LM head are root-managed
        and unsharded for all of forward). That also covers single-model pairs, whose sender uses the
        receiver's embedding outside ReceiverWithHead; sharding ReceiverWithHead as root works only for
        two-model pairs."""
        return list(self.receiver.lm.model.layers)

    def sender_layers(self) -> list[nn.Module]:
        """The sender body's layers (for a single-model pair these ARE the receiver's first layers)."""
        return list(self.sender.layers) if self.sender is not None else []

    def train(self, mode: bool = True) -> TelepathyModel:
        """Only the bridge switches mode: the frozen models stay in eval (no dropout, no HF training paths)."""
        super().train(mode)
        for frozen in (self.sender, self.receiver):
            if frozen is not None:
                frozen.eval()
        return self

    def encode(self, batch: Batch) -> torch.Tensor:
        """Soft tokens (B,K,d_R) for a batch: sender (no grad) then bridge."""
        if batch.sender_states is not None:
            states = batch.sender_states
        else:
            if self.sender is None:
                raise ValueError("batch has no sender_states and the model has no sender")
            with torch.no_grad():
                states = self.sender(
                    input_ids=batch.sender_ids, attention_mask=batch.sender_mask, use_cache=False
                ).last_hidden_state
        with torch.autocast(states.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
            return self.bridge(states, batch.sender_mask)

    def forward(self, batch: Batch) -> StepOutput:
        soft = self.encode(batch)
        lm_loss, _ = self.receiver(batch.primer_ids, soft, batch.answer_ids, batch.answer_mask)
        diversity = batch_diversity(soft)
        loss = lm_loss + self.diversity_weight * diversity
        return StepOutput(loss=loss, lm_loss=lm_loss.detach(), diversity=diversity.detach())

    def prefix(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the receiver reads before it answers, as embeddings, and its mask (None: no padding): the
        layout training used, for generation and label scoring."""
        soft = self.encode(batch)
        return self.receiver.prefix_embeds(batch.primer_ids, soft), self.receiver.prefix_mask(batch.primer_mask, soft)

    @contextlib.contextmanager
    def baseline(self):
        """Around a baseline evaluated beside this run's method: the receiver as loaded (LoRA turns its
        adapters off here)."""
        yield


class SoftPrompt(nn.Module):
    """Prompt tuning's trained part: K vectors in the receiver's embedding space (fp32 master weights),
    initialised from K seeded rows of the receiver's own embedding matrix (Lester et al., 2021)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.tokens = nn.Parameter(init.detach().float().clone())

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        """(B,K,d) for a batch of B rows (`like`: any tensor whose first dimension is B)."""
        return self.tokens.unsqueeze(0).expand(like.size(0), -1, -1)


class PromptTuningModel(TelepathyModel):
    """No sender: the receiver reads [task prompt with the text, K trained soft tokens, answer]. The soft
    tokens sit where the bridge's do (just before the answer); the prompt is left-padded so they line up."""

    method = "prompt_tuning"
    reads = "receiver"

    def encode(self, batch: Batch) -> torch.Tensor:
        return self.bridge(batch.primer_ids)

    def forward(self, batch: Batch) -> StepOutput:
        soft = self.encode(batch)
        lm_loss, _ = self.receiver(batch.primer_ids, soft, batch.answer_ids, batch.answer_mask, batch.primer_mask)
        zero = lm_loss.new_zeros(())
        return StepOutput(loss=lm_loss, lm_loss=lm_loss.detach(), diversity=zero)


class LoraAdapters(nn.Module):
    """The LoRA matrices PEFT injected into the receiver, gathered as one module: what the optimizer, the
    checkpoint and DDP see (the frozen weights are not in it). Its forward runs the receiver, which uses
    these matrices, so DDP's reducer sees every step it has to synchronise."""

    def __init__(self, receiver: ReceiverWithHead):
        from peft.tuners.lora import LoraLayer  # noqa: PLC0415  (peft only for the lora method)

        super().__init__()
        self.a, self.b = nn.ModuleDict(), nn.ModuleDict()
        self._layers = []
        for name, m in receiver.lm.named_modules():
            if isinstance(m, LoraLayer):
                key = name.replace(".", "-")
                self.a[key], self.b[key] = m.lora_A["default"], m.lora_B["default"]
                self._layers.append(m)
        self._receiver = [receiver]  # a plain list: not a submodule, its frozen weights stay out

    def forward(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        return self._receiver[0](*args)

    @contextlib.contextmanager
    def disabled(self):
        for m in self._layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in self._layers:
                m.enable_adapters(True)


class LoraModel(TelepathyModel):
    """No sender: the receiver, with trained LoRA adapters, reads [task prompt with the text, answer]."""

    method = "lora"
    reads = "receiver"

    def _empty(self, batch: Batch) -> torch.Tensor:
        lm = self.receiver.lm
        return torch.zeros(len(batch), 0, lm.config.hidden_size, device=batch.primer_ids.device, dtype=lm.dtype)

    def encode(self, batch: Batch) -> torch.Tensor:
        return self._empty(batch)

    def forward(self, batch: Batch) -> StepOutput:
        args = (batch.primer_ids, self._empty(batch), batch.answer_ids, batch.answer_mask, batch.primer_mask)
        lm_loss, _ = self.bridge(*args)  # through the adapters' module (DDP-wrapped under torchrun)
        return StepOutput(loss=lm_loss, lm_loss=lm_loss.detach(), diversity=lm_loss.new_zeros(()))

    @contextlib.contextmanager
    def baseline(self):
        adapters = self.bridge.module if isinstance(self.bridge, nn.parallel.DistributedDataParallel) else self.bridge
        with adapters.disabled():
            yield


# The receiver's LoRA, as the original's baseline (PEFT; rank 8, alpha 16, query and value projections).
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _shared_body(lm: nn.Module, spec: ModelSpec, num_layers: int, attn: str, dtype: torch.dtype) -> nn.Module:
    """For a single-model pair: a sender body that reuses the receiver's embedding, first layers and rotary
    table instead of a second copy of the weights (Pair.frozen_params counts one copy)."""
    body = load_model(spec, device="meta", attn_implementation=attn, num_layers=num_layers, dtype=dtype)
    decoder = lm.model
    body.embed_tokens = decoder.embed_tokens
    body.layers = nn.ModuleList(list(decoder.layers)[:num_layers])
    body.rotary_emb = decoder.rotary_emb
    body.norm = decoder.norm if num_layers == spec.layers else nn.Identity()
    return body


def _checkpoint_layers(lm: nn.Module) -> None:
    """Activation checkpointing on the receiver's decoder layers (non-reentrant; works in eval mode and
    composes with FSDP2 when applied before sharding)."""

    layers = lm.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)


def build_telepathy_model(cfg: RunConfig, pair: Pair, device: torch.device | str, *, meta: bool = False):
    """(TelepathyModel, sender_tokenizer, receiver_tokenizer) for a run.

    Frozen weights load through loading.py onto `load_device(device, backend)` (this rank's device for
    DDP, the CPU for sharded backends) in the compute dtype of the platform (loading.compute_dtype); the
    bridge is fp32, seeded by train.seed, so every rank starts equal.
    `meta=True` builds everything at full size on the meta device with no weights and no tokenizers
    (tokenizers are then None): the memory tracer materialises it under fake tensors.

    Under FSDP on several ranks the frozen models are built on the meta device and only rank 0 reads the
    checkpoints (to the CPU; `model.frozen_state` holds them there): backends.FSDPWrapped shards the empty
    models and fills every rank's shards from rank 0 by broadcast, so a node holds one copy, not one per rank.
    """
    device = torch.device("meta") if meta else torch.device(device)
    attn, _ = select_attention(device, cfg.train.attention)
    place = device if meta else load_device(device, cfg.backend)
    dtype, _ = compute_dtype(device, cfg.train.precision)
    tap = source_layer(cfg.bridge, pair.sender)
    frozen_state, target_rms = None, None
    from_rank0 = not meta and cfg.backend == "fsdp" and dist.is_initialized() and dist.get_world_size() > 1
    if from_rank0:
        real = build_telepathy_model(cfg.replace(backend="ddp"), pair, "cpu")[0] if dist.get_rank() == 0 else None
        box = [float(real.bridge.output_scale) if real is not None else None]
        dist.broadcast_object_list(box, src=0)
        target_rms, place = box[0], torch.device("meta")
        if real is not None:
            frozen_state = {
                name: getattr(real, name).state_dict()
                for name in ("sender", "receiver")
                if getattr(real, name) is not None
            }
    lm = load_model(pair.receiver, device=place, attn_implementation=attn, dtype=dtype)
    if cfg.method in ("prompt_tuning", "lora"):
        model = _receiver_only(cfg, lm, dtype, device)
        return (model, None, None) if meta else (model, load_tokenizer(pair.sender), load_tokenizer(pair.receiver))
    if cfg.train.sender_cache:
        sender = None
    elif pair.single:
        sender = _shared_body(lm, pair.sender, tap, attn, dtype)
    else:
        sender = load_model(pair.sender, device=place, attn_implementation=attn, num_layers=tap, dtype=dtype)
    if cfg.train.activation_checkpointing:
        _checkpoint_layers(lm)
    if target_rms is None:
        target_rms = 1.0 if meta else target_rms_of(lm)
    # Initialised on the CPU (or meta) from train.seed, then moved: the same bridge on every rank and device.
    with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
        torch.manual_seed(cfg.train.seed)
        bridge = Bridge(cfg.bridge, pair.sender.hidden, pair.receiver.hidden, target_rms)
    bridge = bridge.to(device if place.type == "meta" and not meta else place)
    model = TelepathyModel(sender, bridge, ReceiverWithHead(lm), cfg.bridge.diversity_weight, dtype)
    model.frozen_state, model.fill_from_rank0 = frozen_state, from_rank0
    if meta:
        return model, None, None
    return model, load_tokenizer(pair.sender), load_tokenizer(pair.receiver)


def _receiver_only(cfg: RunConfig, lm: nn.Module, dtype: torch.dtype, device: torch.device) -> TelepathyModel:
    """Prompt tuning or LoRA on the receiver (DDP or one process: RunConfig refuses sharded backends for
    them), the trained part initialised from train.seed."""
    receiver = ReceiverWithHead(lm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        if cfg.method == "prompt_tuning":
            table = lm.get_input_embeddings().weight
            rows = torch.randperm(table.size(0))[: cfg.bridge.soft_tokens]
            return PromptTuningModel(None, SoftPrompt(table[rows.to(table.device)]), receiver, 0.0, dtype)
        from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415  (peft only for the lora method)

        # the adapters' init (kaiming A, zero B) draws from the seeded generator
        inject_adapter_in_model(LoraConfig(**LORA), lm)
        lm.to(device)
    # fp32 master weights, as the bridge's (PEFT computes the adapters in their dtype and casts the sum back)
    return LoraModel(None, LoraAdapters(receiver).float(), receiver, 0.0, dtype)
